"""Benchmarks (printed, never asserted), each figure next to the limit it is measured against:

    python -m probegen.bench                 the machine's matmul limit; every hot training step (FLOPs,
                                             seconds by phase, fraction of the limit); the CNN probing step;
                                             seeds as one ensemble vs one after another; ProbeGen batched
                                             vs a per-model loop; path patching hypotheses/s
    python -m probegen.bench --official DIR  + the official ProbeGen code (a local clone of
                                             jonkahana/ProbeGen) side by side with ours, whole processes
    python -m probegen.bench --gpt2          + path patching at GPT-2-small scale: engine vs hooks
    python -m probegen.bench --pipeline      + the default `dvc repro` and `dvc exp run -S num_probes=64`
                                             on a fresh clone of HEAD
    python -m probegen.bench --scale full    + synthetic zoos of the real sizes: probing throughput and
                                             projected time of one full paper run per zoo
    python -m probegen.bench --compile       + the ProbeGen step under torch.compile beside eager
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from probegen.bench_train import dense_backward, seconds_per_call
from probegen.methods import build_method
from probegen.nets import forward_zoo, get_family
from probegen.optim import CosineAdam
from probegen.training import resolve_device
from probegen.nets.siren import DWSNETS_ARCH
from probegen.scale import full_scale_report, synthetic_zoo, wild_park_padding_cost
from probegen.zoo.packed import load_packed


def digits_inr_zoo():
    path = Path("data/zoos/digits_inr")
    if path.exists():
        return load_packed(path)
    return synthetic_zoo("siren", [DWSNETS_ARCH], np.zeros(1797, dtype=np.int64), "classification")


def probegen_steps_per_second(zoo, num_probes=128, batch=32, steps=30, device="cpu"):
    """Training steps/s of ProbeGen: the batched functional forward vs a Python loop over nn.Modules
    (one reference module per zoo member, as the official implementation probes them)."""
    method = build_method("probegen", zoo, {}, num_probes=num_probes, seed=0).to(device)
    opt = CosineAdam(method.parameters(), lr=3e-4, weight_decay=0.0, decoupled=False,
                     total_steps=10 ** 6)  # the training loop's optimizer; a benchmark's rate hardly moves
    fam = get_family(zoo.family)
    n = min(len(zoo), 512)
    weights = zoo.weights[:n].to(device)  # (n, D)
    arch_ids = torch.tensor(zoo.arch_ids[:n]).to(device)
    labels = torch.as_tensor(np.asarray(zoo.labels[:n])).long().to(device)
    modules = [fam.reference_module(zoo.archs[int(a)], weights[i]).to(device).requires_grad_(False)
               for i, a in enumerate(arch_ids)]
    gen = torch.Generator().manual_seed(0)

    def step(loop):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if loop:
            probes = method.probes()  # (K, 2)
            responses = torch.stack([modules[i](probes) for i in idx.tolist()])  # (B, K, 1)
            logits = method.head(responses.flatten(1))
        else:
            logits = method(weights[idx], arch_ids[idx])  # (B, 10)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def probe_only(loop):
        """Just probing: every model of a batch on the K probes, forward and backward to the probes."""
        idx = torch.randint(0, n, (batch,), generator=gen)
        probes = method.probes()
        if loop:
            responses = torch.stack([modules[i](probes) for i in idx.tolist()])  # (B, K, 1)
        else:
            responses = forward_zoo(zoo.family, zoo.archs, arch_ids[idx], weights[idx], probes)  # (B, K, 1)
        dense_backward(responses)

    def per_s(fn, calls):
        return 1 / seconds_per_call(fn, calls, device, warmup=3)

    batched = per_s(lambda: step(False), steps)
    looped = per_s(lambda: step(True), max(5, steps // 3))
    probe_batched = per_s(lambda: probe_only(False), steps)
    probe_looped = per_s(lambda: probe_only(True), max(5, steps // 3))
    return {"batched_steps_per_s": batched, "loop_steps_per_s": looped, "speedup": batched / looped,
            "probing_only_batched_per_s": probe_batched, "probing_only_loop_per_s": probe_looped,
            "probing_only_speedup": probe_batched / probe_looped}


def stage_timings():
    """The last pipeline run's timings, as the stages logged them (.probegen/logs/, outside the outputs)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(".probegen/logs").glob("*.json"))}


def digits_cnn_zoo():
    path = Path("data/zoos/digits_cnn")
    if path.exists():
        return load_packed(path)
    from probegen.nets.small_cnn import zoo_arch
    return synthetic_zoo("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], np.arange(600) % 2, "regression")


def dead_leaves_pool():
    path = Path("data/probes/dead_leaves.npy")
    if path.exists():
        return np.load(path, mmap_mode="r")
    from probegen.probes.dead_leaves import render
    return render(128, 32, seed=0)


def training_steps(device, limit, methods):
    """A profile of one training step of every method on both embedded zoos (K = 128, batch 32)."""
    from probegen import config
    from probegen.bench_train import step_profile
    from probegen.methods import METHODS

    params = config.load_params() if Path("params.yaml").exists() else {}
    pool = dead_leaves_pool()
    out = {}
    for zoo_name, zoo in (("digits_inr", digits_inr_zoo()), ("digits_cnn", digits_cnn_zoo())):
        for name in methods:
            if METHODS[name].why_unsupported(zoo.family):
                continue
            cfg = config.method_config(params, name, zoo_name) if params else {}
            out[f"{zoo_name} {name}"] = step_profile(name, zoo, cfg, device=device, pool=pool, limit=limit)
    return out


def pipeline_times(repo="."):
    """Time the default `dvc repro` on a fresh clone of HEAD, then `dvc exp run -S num_probes=64`."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(Path(repo).resolve()), str(clone)], check=True)
        times = {}
        for name, cmd in (("dvc_repro_s", "dvc repro"), ("dvc_exp_run_num_probes_64_s", "dvc exp run -S num_probes=64")):
            start = time.perf_counter()
            subprocess.run(cmd, shell=True, cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
            times[name] = time.perf_counter() - start
    times["exp_run_fraction_of_repro"] = times["dvc_exp_run_num_probes_64_s"] / times["dvc_repro_s"]
    return times


def machine(device):
    from probegen.bench_train import matmul_limit

    limit = matmul_limit(device)
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "matmul_limit_gflops": limit / 1e9}, limit


def report(title, values):
    print(f"\n== {title}")
    for key, value in values.items():
        print(f"  {key:42s} {value:.3f}" if isinstance(value, float) else f"  {key:42s} {value}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m probegen.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="store_true", help="also time the full default dvc repro")
    parser.add_argument("--scale", choices=["embedded", "full"], default="embedded")
    parser.add_argument("--official", metavar="PATH",
                        help="also run the official ProbeGen code (a clone or its git dir) beside ours as whole "
                             "processes: 30 epochs on digits_inr, K=128, batch 32, CPU")
    parser.add_argument("--official-seeds", type=int, nargs="+", default=[1], metavar="SEED",
                        help="seeds of that comparison (default: 1, the official default)")
    parser.add_argument("--official-rounds", type=int, default=1, metavar="N",
                        help="run that pair N times, alternating which goes first; medians reported")
    parser.add_argument("--gpt2", action="store_true", help="also path patching at GPT-2-small scale: the "
                        "engine vs one hooked forward per hypothesis (15-25 min)")
    parser.add_argument("--compile", action="store_true", help="also the ProbeGen step on digits_inr under "
                        "torch.compile beside eager: compile time, steady-state step, loss agreement (~1 min)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="*", help="methods whose training step to profile (default: all)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    info, limit = machine(device)
    report("machine (the limit: best dense float32 matmul rate)", info)
    from probegen.bench_train import ensemble_speedup, generator_step, probing_step
    from probegen.methods import available

    # First: its glibc-default peer figure needs a heap that no earlier measurement has grown. It ends
    # with the stages' memory policy (probegen.runtime) on, for everything after it.
    cnn = digits_cnn_zoo()
    probes = build_method("probegen", cnn, {}, num_probes=128, seed=0).probes()
    report("CNN probing step: 32 Small-CNN-Zoo models x 128 probe images, forward + backward to the probes",
           probing_step(cnn, probes, device=device, limit=limit))
    report("ProbeGen image generator (6 transposed convs), K=128, forward + backward: basis vs layer by layer",
           generator_step(device=device, limit=limit))
    for name, profile in training_steps(device, limit, args.methods or available()).items():
        report(f"training step: {name} (K=128, batch 32)", profile)
    inr = digits_inr_zoo()
    order = np.random.default_rng(0).permutation(len(inr))[:900].tolist()  # the zoo is stored digit by digit
    split = {"train": order[:600], "val": order[600:700], "test": order[700:]}
    for name, cfg in (("probegen", {}), ("mlp", {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4,
                                                 "grad_clip": 10.0})):
        report(f"3 seeds of {name} on digits_inr: one vmapped ensemble vs one after another",
               ensemble_speedup(name, inr, split, cfg, device=device))
    report("ProbeGen on digits_inr (K=128, batch 32): batched forward vs per-model nn.Module loop",
           probegen_steps_per_second(inr, device=device))
    if args.compile:
        from probegen.bench_train import compiled_step
        report("ProbeGen step on digits_inr (K=128, batch 32): torch.compile vs eager", compiled_step(inr, device=device))
    for stage, timing in stage_timings().items():
        report(f"last pipeline run: {stage}", timing)
    from probegen.patching.bench import bench_patching
    report("path patching on the induction model: hypotheses/s", bench_patching())
    if args.gpt2:
        from probegen.patching.bench import bench_gpt2, bench_gpt2_interleaved
        report("path patching, random GPT-2-small-size model (12 x 12, d 768, seq 64, 16 pairs): interleaved",
               bench_gpt2_interleaved(device=device))
        report("the same, each method in its own process (peak memory)", bench_gpt2(device=device))
    if args.official:
        from probegen.bench_official import official_vs_ours, report_lines
        print("\n" + "\n".join(report_lines(official_vs_ours(args.official, seeds=args.official_seeds,
                                                            rounds=args.official_rounds))))
    if args.scale == "full":
        for zoo, values in full_scale_report(device).items():
            report(f"full scale: {zoo}", values)
        report("Wild Park: grouping by architecture vs zero-padding to one", wild_park_padding_cost(device))
    if args.pipeline:
        report("pipeline (fresh clone of HEAD)", pipeline_times())


if __name__ == "__main__":
    sys.exit(main())
