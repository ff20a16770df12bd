"""Training at the hardware's pace: what one step costs, next to what the machine can do.

    matmul_limit(device)              this machine's dense float32 matmul rate (FLOP/s): the limit
    step_profile(method, zoo, ...)    one training step: FLOPs counted from the shapes (forward + backward,
                                      probegen.flops), seconds split into data, forward, backward,
                                      optimizer, and the part of them that is Python and dispatch (wall time
                                      minus the time inside aten kernels, from the profiler)
    probing_step(zoo, ...)            the probing alone: B models on K probes, forward and backward to the
                                      probes, as one ProbeGen step runs it
    generator_step(...)               ProbeGen's image generator, its map formed on the latent basis vs the
                                      K latents through its layers
    ensemble_speedup(...)             S seeds trained as one vmapped ensemble vs one after another, with
                                      the test metric of both (they must agree)
    compiled_step(zoo, ...)           the ProbeGen step under torch.compile beside eager: compile seconds,
                                      steady-state step, and how far their losses part on the same batches

FLOPs count matmuls and convolutions (2 per multiply-add); elementwise work is not counted, so the ratio to
the matmul limit is an upper bound on how well a step uses the machine.
"""

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from probegen.flops import count_flops
from probegen.methods import build_method
from probegen.nets import forward_zoo
from probegen.runtime import keep_freed_memory
from probegen.training import _optimizer, _Split, train_seeds


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_limit(device="cpu", n=1024, repeats=5):
    """Best of `repeats` timings of an (n, n) @ (n, n) float32 matmul -> FLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def step_profile(name, zoo, cfg, *, num_probes=128, batch_size=32, steps=30, device="cpu", pool=None, limit=None):
    """Seconds per training step of method `name` on `zoo` (its first training rows), split by phase; FLOPs
    per step from the shapes; achieved FLOP/s and its ratio to `limit` (the matmul rate)."""
    method = build_method(name, zoo, cfg, num_probes=num_probes, probe_pool=pool, seed=0)
    n = min(len(zoo), 1024)
    method.prepare(zoo, np.arange(n))
    method.to(device)
    data = _Split(zoo, np.arange(n), torch.device(device))
    opt = _optimizer([p for p in method.parameters() if p.requires_grad], cfg.get("optimizer", "adam"),
                     cfg.get("lr", 3e-4), cfg.get("weight_decay", 0.0), total_steps=3 + steps)
    regression = zoo.task == "regression"
    gen = torch.Generator().manual_seed(0)
    method.train()

    def loss_of(w, a, y):
        out = method(w, a).float()
        return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)

    def step(times):
        t = [time.perf_counter()]
        w, a, y = data.batch(torch.randint(0, n, (batch_size,), generator=gen))
        for phase in ("data", "forward", "backward", "optimizer"):
            if phase == "forward":
                loss = loss_of(w, a, y)
            elif phase == "backward":
                opt.zero_grad()
                loss.backward()
            elif phase == "optimizer":
                opt.step()
            _sync(device)
            t.append(time.perf_counter())
            times[phase] = times.get(phase, 0.0) + t[-1] - t[-2]

    warm = {}
    for _ in range(3):
        step(warm)
    times = {}
    for _ in range(steps):
        step(times)
    per_step = {k: v / steps for k, v in times.items()}
    total = sum(per_step.values())
    w, a, y = data.batch(torch.arange(batch_size) % n)
    flops = count_flops(lambda: loss_of(w, a, y).backward())
    opt.zero_grad()
    out = {"steps_per_s": 1 / total, "step_ms": 1e3 * total, "flops_per_step": flops,
           "achieved_gflops": flops / total / 1e9,
           **{f"{k}_ms": 1e3 * v for k, v in per_step.items()},
           "python_and_dispatch_ms": 1e3 * _overhead(step, steps=5)}
    if limit:
        out["fraction_of_matmul_limit"] = flops / total / limit
    return out


def compiled_step(zoo, *, name="probegen", num_probes=128, batch_size=32, steps=100, compare=20, device="cpu"):
    """One training step of `name` eager and under torch.compile (default mode, forward and backward), side by
    side: the compiled path's first steps (compilation), then both at steady state; and the largest
    difference of their per-step losses over `compare` steps on the same batches from the same
    initialisation (they train the same model, to float rounding). Imports torch._dynamo: benchmark only."""
    n = min(len(zoo), 1024)
    data = _Split(zoo, np.arange(n), torch.device(device))
    paths = {}
    for mode in ("eager", "compiled"):
        method = build_method(name, zoo, {}, num_probes=num_probes, seed=0).to(device)
        opt = _optimizer(list(method.parameters()), "adam", 3e-4, 0.0, total_steps=10 ** 6)

        def loss_of(w, a, y, method=method):
            return F.cross_entropy(method(w, a), y)

        paths[mode] = (torch.compile(loss_of) if mode == "compiled" else loss_of, opt)

    def step(mode, pos):
        loss_fn, opt = paths[mode]
        loss = loss_fn(*data.batch(pos))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    warmup = 5
    batches = torch.randint(0, n, (compare + warmup + steps, batch_size), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    compiled_losses = [step("compiled", batches[0])]
    _sync(device)
    first = time.perf_counter() - t0
    compiled_losses += [step("compiled", pos) for pos in batches[1:compare]]
    eager_losses = [step("eager", pos) for pos in batches[:compare]]
    out = {"compile_and_first_step_s": first}
    for mode in ("eager", "compiled"):
        out[f"{mode}_step_ms"] = 1e3 * seconds_per_call(
            lambda it=iter(batches[compare:]): step(mode, next(it)), steps, device, warmup=warmup)
    out["speedup"] = out["eager_step_ms"] / out["compiled_step_ms"]
    out["max_loss_difference_first_steps"] = (torch.stack(eager_losses) - torch.stack(compiled_losses)).abs().max().item()
    return out


def _overhead(step, steps):
    """Wall time per step not spent inside aten kernels (profiler self times): Python, autograd, dispatch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step({})
        wall = time.perf_counter() - t0
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return max(0.0, wall - kernels) / steps


def dense_backward(out):
    """Backpropagate a dense random cotangent from out, as a loss would. out.sum().backward() would feed a
    stride-0 gradient, on which some kernels take slow paths (a (K, 1) @ (1, n) bmm: 7x slower)."""
    out.backward(_cotangent(tuple(out.shape), out.dtype, out.device))


@functools.lru_cache(maxsize=8)
def _cotangent(shape, dtype, device):
    # drawn once per shape: a timed loop calling dense_backward then only looks it up
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)


def seconds_per_call(fn, calls, device, warmup=1):
    """Wall seconds per call of fn after `warmup` calls, the device synchronised around the timed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def probing_step(zoo, probes, *, batch_size=32, steps=10, device="cpu", limit=None):
    """B models on the K probes, forward and backward to the probes (what a ProbeGen step's probing costs),
    under glibc's default malloc and then under probegen.runtime's policy, which stays on. Call it before
    anything has grown the heap (bench.main does): the default figure needs a heap without kept blocks."""
    weights = zoo.weights[:batch_size].to(device)
    ids = torch.tensor(zoo.arch_ids[:batch_size]).to(device)  # a copy: the packed arch ids are read-only
    probes = probes.detach().to(device).requires_grad_()

    def once():
        dense_backward(forward_zoo(zoo.family, zoo.archs, ids, weights, probes))

    # Under glibc's default malloc first (where it can be set), the peer figure of probegen.runtime's policy.
    default_seconds = seconds_per_call(once, steps, device) if keep_freed_memory(False) else None
    keep_freed_memory(True)
    seconds = seconds_per_call(once, steps, device)
    flops = count_flops(once)
    out = {"probing_ms": 1e3 * seconds, "flops": flops, "achieved_gflops": flops / seconds / 1e9}
    if default_seconds is not None:
        out["probing_ms_glibc_default_malloc"] = 1e3 * default_seconds
    if limit:
        out["fraction_of_matmul_limit"] = flops / seconds / limit
        out["times_the_limit"] = seconds / (flops / limit)
    return out


def generator_step(*, num_probes=128, steps=10, device="cpu", limit=None):
    """ProbeGen's image generator (CIFAR10-GS: 6 transposed convs), forward + backward for K probes: its
    affine map formed on the latent basis (what training runs) beside the K latents through the stack
    layer by layer, the same map; the outputs' largest difference shows it is."""
    from probegen.probes.generators import ConvGenerator

    gen = ConvGenerator(1, layers=6).to(device)
    z = torch.randn(num_probes, gen.net[0].in_channels, device=device, requires_grad=True)  # (K, 32)
    ways = {"basis": gen.affine, "layer_by_layer": gen.layer_by_layer}
    out = {}
    for name, affine in ways.items():
        def once():
            gen.zero_grad()
            torch.tanh(affine(z)).sum().backward()

        seconds, flops = seconds_per_call(once, steps, device), count_flops(once)
        out.update({f"{name}_ms": 1e3 * seconds, f"{name}_flops": flops, f"{name}_gflops": flops / seconds / 1e9})
        if limit:
            out[f"{name}_fraction_of_matmul_limit"] = flops / seconds / limit
    with torch.no_grad():
        out["max_abs_difference"] = (ways["basis"](z) - ways["layer_by_layer"](z)).abs().max().item()
    out["speedup"] = out["layer_by_layer_ms"] / out["basis_ms"]
    return out


def ensemble_speedup(name, zoo, split, cfg, *, seeds=(0, 1, 2), epochs=2, batch_size=32, num_probes=128,
                     pool=None, device="cpu"):
    """Train `seeds` together (one vmapped ensemble) and one after another; seconds and test metrics."""
    out = {}
    for mode, stack in (("ensemble", True), ("sequential", False)):
        methods = [build_method(name, zoo, cfg, num_probes=num_probes, probe_pool=pool, seed=s) for s in seeds]
        t0 = time.perf_counter()
        results = train_seeds(methods, zoo, split, seeds=list(seeds), epochs=epochs, batch_size=batch_size,
                              lr=cfg.get("lr", 3e-4), optimizer=cfg.get("optimizer", "adam"),
                              weight_decay=cfg.get("weight_decay", 0.0), grad_clip=cfg.get("grad_clip"),
                              eval_every=10 ** 9, device=device, progress=False, stack=stack)
        out[f"{mode}_s"] = time.perf_counter() - t0
        out[f"{mode}_test"] = [round(r.metrics["test"], 4) for r in results]
    out["speedup"] = out["sequential_s"] / out["ensemble_s"]
    return out
