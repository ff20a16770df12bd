"""Full-scale projection: synthetic zoos of the real sizes and shapes, probing-training throughput, and the
projected time of one full paper run per zoo (`python -m probegen.bench --scale full`).

Weights are random (throughput does not depend on their values); sizes follow REFERENCE §2 and the
schedules follow the paper: 55,000 training INRs x 30 epochs; the Small CNN Zoo's ~12,000 training CNNs
x 150 epochs; Wild Park's ~80% of 117,241 checkpoints x 30 epochs. K = 128, batch 32.
"""

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from probegen.methods import build_method
from probegen.nets import forward_zoo, num_params
from probegen.nets.siren import DWSNETS_ARCH
from probegen.optim import CosineAdam
from probegen.nets.small_cnn import zoo_arch
from probegen.zoo.packed import PackedZoo, ragged

# zoo -> (family, models in the synthetic zoo, models in the real zoo, training models in a paper run,
#         epochs, task). Wild Park's synthetic zoo is smaller than the real one: its size is projected.
FULL = {
    "mnist_inr": ("siren", 70_000, 70_000, 55_000, 30, "classification"),
    "cifar10_gs": ("small_cnn", 30_000, 30_000, 12_000, 150, "regression"),
    "wild_park": ("wild_park", 2_000, 117_241, 93_793, 30, "regression"),
}


def wild_park_archs(num, seed=0):
    """Architectures drawn like the CNN Wild Park sampler: 2-5 convs, channels {4,8,16,32}, kernels
    {3,5,7} with padding k//2, stride 1, residual connections, six activations."""
    rng = np.random.default_rng(seed)
    archs = []
    for _ in range(num):
        n = int(rng.integers(2, 6))
        kernels = [int(k) for k in rng.choice([3, 5, 7], n)]
        residual = [int(rng.integers(-1, i - 1)) if i >= 2 and rng.random() < 0.5 else -1 for i in range(n)]
        archs.append({"in_channels": 3, "channels": [int(c) for c in rng.choice([4, 8, 16, 32], n)],
                      "kernel_size": kernels, "stride": [1] * n, "padding": [k // 2 for k in kernels],
                      "residual": residual, "activation": [str(rng.choice(["relu", "gelu", "tanh", "sigmoid",
                                                                           "leaky_relu", "none"]))] * n,
                      "num_classes": 10})
    return archs


def synthetic_zoo(family, archs, arch_ids, task, seed=0):
    """A PackedZoo in memory with random weights (speed does not depend on their values), stored ragged
    like a packed zoo."""
    sizes = np.array([num_params(family, a) for a in archs])[arch_ids]  # (N,)
    gen = np.random.default_rng(seed)
    flat = gen.standard_normal(int(sizes.sum()), dtype=np.float32) * 0.1
    labels = gen.integers(0, 10, len(arch_ids)) if task == "classification" else gen.random(len(arch_ids))
    meta = pd.DataFrame({"id": np.arange(len(arch_ids)).astype(str), "arch": arch_ids})
    spec = {"family": family, "task": task, "num_classes": 10, "archs": archs}
    return PackedZoo(None, ragged(flat, sizes), labels, meta, spec)


def build_synthetic(zoo_name):
    family, num, _, _, _, task = FULL[zoo_name]
    if family == "siren":
        return synthetic_zoo(family, [DWSNETS_ARCH], np.zeros(num, dtype=np.int64), task)
    if family == "small_cnn":
        ids = (np.arange(num) % 2).astype(np.int64)  # relu and tanh runs
        return synthetic_zoo(family, [zoo_arch("relu"), zoo_arch("tanh")], ids, task)
    archs = wild_park_archs(200)
    return synthetic_zoo(family, archs, np.random.default_rng(0).integers(0, len(archs), num), task)


def steps_per_second(zoo, device, num_probes=128, batch=32, steps=10):
    method = build_method("probegen", zoo, {}, num_probes=num_probes, seed=0).to(device)
    opt = CosineAdam(method.parameters(), lr=3e-4, weight_decay=0.0, decoupled=False,
                     total_steps=10 ** 6)  # the training loop's optimizer; a benchmark's rate hardly moves
    gen = torch.Generator().manual_seed(0)
    regression = zoo.task == "regression"

    def step():
        idx = torch.randint(0, len(zoo), (batch,), generator=gen).numpy()
        w = zoo.weights[idx].to(device)
        y = torch.as_tensor(zoo.labels[idx]).to(device)
        out = method(w, torch.as_tensor(zoo.arch_ids[idx]).to(device))
        loss = F.mse_loss(out.float(), y.float()) if regression else F.cross_entropy(out.float(), y.long())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def wild_park_padding_cost(device, num_probes=128, batch=32):
    """Seconds per forward + backward (to the probes) of one Wild Park batch, two ways: grouped by
    architecture, as forward_zoo runs it (in this zoo nearly every run has its own architecture, so a
    batch is ~one grouped call per model), and every model at the largest shape the sampler draws (5
    layers, 32 channels, 7x7 kernels), which is what exact zero-padding to one architecture would cost.
    Random weights: only the cost is measured."""
    archs = wild_park_archs(200)
    ids = np.random.default_rng(0).integers(0, len(archs), batch)
    zoo = synthetic_zoo("wild_park", archs, ids, "regression")
    L = max(len(a["channels"]) for a in archs)
    widest = {**archs[0], "channels": [32] * L, "kernel_size": [7] * L, "stride": [1] * L, "padding": [3] * L,
              "residual": [-1] * L, "activation": ["relu"] * L}
    padded = synthetic_zoo("wild_park", [widest], np.zeros(batch, dtype=np.int64), "regression")
    x = torch.randn(num_probes, 3, 32, 32, device=device, requires_grad=True)

    def seconds(archs, ids, weights):
        ids, weights = torch.tensor(ids).to(device), weights.to(device)
        for timed in (False, True):  # a warm-up, then one timed pass
            start = time.perf_counter()
            forward_zoo("wild_park", archs, ids, weights, x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    grouped = seconds(archs, ids, zoo.weights[:])
    zero_padded = seconds([widest], padded.arch_ids, padded.weights[:])
    return {"distinct_archs_in_batch": len(set(ids.tolist())), "grouped_s": grouped,
            "zero_padded_s": zero_padded, "zero_padded_over_grouped": zero_padded / grouped}


def full_scale_report(device):
    report = {}
    for name, (family, num, real, train, epochs, _) in FULL.items():
        start = time.perf_counter()
        zoo = build_synthetic(name)
        built = time.perf_counter() - start
        rate = steps_per_second(zoo, device)
        total_steps = epochs * math.ceil(train / 32)
        report[name] = {"family": family, "synthetic_models": num, "synthetic_zoo_gb": zoo.weights.nbytes / 1e9,
                        "packed_real_zoo_gb": zoo.weights.nbytes / num * real / 1e9,
                        "padded_real_zoo_gb": zoo.weights.shape[1] * 4 * real / 1e9, "build_s": built,
                        "steps_per_s": rate, "paper_run_steps": total_steps,
                        "projected_paper_run_min": total_steps / rate / 60}
    return report
