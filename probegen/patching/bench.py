"""Throughput of the path-patching engines.

bench_patching: the induction model (2 layers x 4 heads, V=64, T=40, d=64). Two workloads over the model's 169 concrete paths:
  random  sets of 1-8 random concrete paths (mostly emb -> 0.h -> 1.h' -> out: the costly kind)
  greedy  one greedy-refinement round: the induction hypothesis plus each other path in turn
The fast engine is timed batched (`chunk` hypotheses per pass) and one hypothesis at a time, each with a
fresh Patcher (its planning memo starts empty); the brute-force treeified evaluator on a few hypotheses.
Weights are random: speed does not depend on training.

bench_gpt2: a random-weight GPT-2 of GPT-2 small's shape through graph_from_hf, the fast engine against one
hooked forward of the Hugging Face model per hypothesis (the way hook-based libraries patch), see below.
"""

import random
import time

import numpy as np
import torch

from probegen.patching.engine import Patcher
from probegen.patching.paths import Hypothesis, Path, all_paths, parse_hypothesis
from probegen.patching.transformer import AttnOnlyTransformer, TransformerConfig

INDUCTION = "{emb -> 1.1.q -> out, emb -> 1.1.v -> out, emb -> 0.0 -> 1.1.k -> out}"


def bench_patching(n_hyps=128, n_brute=4, n_pairs=64, chunk=8, seed=0) -> dict:
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(TransformerConfig())
    graph = model.patch_graph()
    x_r = torch.randint(0, model.cfg.vocab, (n_pairs, model.cfg.seq_len))
    x_c = torch.randint(0, model.cfg.vocab, (n_pairs, model.cfg.seq_len))
    paths = all_paths(graph)
    rng = random.Random(seed)
    base = parse_hypothesis(graph, INDUCTION)
    workloads = {
        "random": [Hypothesis(tuple(rng.sample(paths, rng.randint(1, 8)))) for _ in range(n_hyps)],
        "greedy": [base.union(p) for p in paths if not base.contains(p)][:n_hyps],
    }
    t0 = time.perf_counter()
    Patcher(graph, x_r, x_c)
    out = {"patching_paths": len(paths), "patching_pairs": n_pairs, "patching_chunk": chunk,
           "patching_cache_s": time.perf_counter() - t0}
    for name, hyps in workloads.items():
        fast, t_batched = _timed(lambda: list(Patcher(graph, x_r, x_c).outputs(hyps, chunk=chunk)))
        single, t_single = _timed(lambda: list(Patcher(graph, x_r, x_c).outputs(hyps, chunk=1)))
        patcher = Patcher(graph, x_r, x_c)
        brute, t_brute = _timed(lambda: [patcher.brute_output(h) for h in hyps[:n_brute]])
        diff = max(_max_diff(fast, single), _max_diff(fast[:n_brute], brute))
        out.update({
            f"patching_{name}_fast_batched_hyps_per_s": len(hyps) / t_batched,
            f"patching_{name}_fast_single_hyps_per_s": len(hyps) / t_single,
            f"patching_{name}_brute_force_hyps_per_s": n_brute / t_brute,
            f"patching_{name}_speedup_vs_brute": (len(hyps) / t_batched) / (n_brute / t_brute),
            f"patching_{name}_max_abs_diff": diff,
        })
    return out


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _max_diff(xs, ys):
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


# ------------------------------------------------------------------------------- GPT-2 scale: engine vs hooks


def random_path(graph, rng, skip=()):
    """A uniformly chosen slot and sender at every step, from the output back to a leaf (leaves in `skip`,
    e.g. constant biases, are never chosen)."""
    items, name = [], graph.output
    while not graph.is_leaf(name):
        slots = graph.slots(name)
        slot = rng.choice(sorted(slots))
        items.append((name, slot if len(slots) > 1 else None))
        name = rng.choice([s for s in slots[slot] if s not in skip])
    return Path(((name, None),) + tuple(reversed(items)))


def path_edges(path):
    """The (sender, receiver-slot) edges of a concrete path, receivers written as in path strings."""
    items = path.items
    return {(a[0], b[0] if b[1] is None else f"{b[0]}.{b[1]}") for a, b in zip(items, items[1:])}


def edge_closure(graph, edges):
    """Every input -> output path all of whose edges are in `edges`: the hypothesis a circuit (edge set) stands
    for, and the one a single patched forward with per-edge switching computes."""
    into = {}
    for sender, receiver in edges:
        into.setdefault(receiver, []).append(sender)
    out = []

    def walk(name, suffix):
        if graph.is_leaf(name):
            out.append(Path(((name, None),) + suffix))
            return
        slots = graph.slots(name)
        for q in slots:
            key = f"{name}.{q}" if len(slots) > 1 else name
            elem = (name, q if len(slots) > 1 else None)
            for s in into.get(key, ()):
                walk(s, (elem,) + suffix)

    walk(graph.output, ())
    return out


GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768)


def bench_gpt2(seq=64, pairs=16, n_edge=8, n_multi=8, chunk=4, seed=0, device="cpu", size=None, isolate=True,
               order=("hooks", "engine")):
    """Hypotheses/s on a random-weight GPT-2 (GPT-2 small's shape by default), head-level graph: the fast engine
    vs one hooked forward of the model per hypothesis (hooks.HookPatcher), for single-edge hypotheses
    (sender -> receiver path patching) and for random multi-path circuits (the edges of 1-8 random paths and
    every path made of them), each method in its own process for its peak memory, in `order` (on a shared
    machine, run both orders: load drifts). Outputs are checked equal."""
    args = dict(seq=seq, pairs=pairs, n_edge=n_edge, n_multi=n_multi, chunk=chunk, seed=seed, device=device,
                size=size or GPT2_SMALL)
    out = {"gpt2_layers": args["size"]["n_layer"], "gpt2_heads": args["size"]["n_head"], "gpt2_d": args["size"]["n_embd"],
           "gpt2_seq": seq, "gpt2_pairs": pairs, "gpt2_chunk": chunk}
    results = {m: (_in_process if not isolate else _in_subprocess)(m, args) for m in order}
    for kind in ("edge", "multi"):
        for method, res in results.items():
            out[f"gpt2_{kind}_{method}_hyps_per_s"] = res[f"{kind}_n"] / res[f"{kind}_s"]
        out[f"gpt2_{kind}_speedup"] = out[f"gpt2_{kind}_engine_hyps_per_s"] / out[f"gpt2_{kind}_hooks_hyps_per_s"]
        out[f"gpt2_{kind}_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in
                                               zip(results["engine"][f"{kind}_kl"], results["hooks"][f"{kind}_kl"]))
    for method, res in results.items():
        out[f"gpt2_{method}_setup_s"] = res["setup_s"]
        out[f"gpt2_{method}_peak_mem_mb"] = res["peak_mb"]
    out["gpt2_multi_mean_paths"] = results["engine"]["multi_paths"]
    return out


def _in_subprocess(method, args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_in_process, method, args).result()


def _gpt2_workload(args):
    """The model, the pairs and the hypotheses (identical in every process: everything is seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from probegen.patching.hf import graph_from_hf
    torch.manual_seed(args["seed"])
    model = GPT2LMHeadModel(GPT2Config(**args["size"])).eval().to(args["device"])
    gen = torch.Generator().manual_seed(args["seed"])
    V = model.config.vocab_size
    x_r, x_c = (torch.randint(0, V, (args["pairs"], args["seq"]), generator=gen).to(args["device"]) for _ in range(2))
    graph = graph_from_hf(model)
    rng = random.Random(args["seed"])
    static = {n for n in graph.inputs if n.endswith(".bias")}
    edges = []
    while len(edges) < args["n_edge"]:  # a random receiver slot and one of its non-constant senders
        receiver = rng.choice([n for n in graph.order if n != graph.output])
        slot = rng.choice(sorted(graph.slots(receiver)))
        senders = [s for s in graph.slots(receiver)[slot] if s not in static and s != "wpe"]
        if senders:
            edges.append((rng.choice(senders), receiver if len(graph.slots(receiver)) == 1 else f"{receiver}.{slot}"))
    circuits = [set().union(*(path_edges(random_path(graph, rng, static | {"wpe"})) for _ in range(rng.randint(1, 8))))
                for _ in range(args["n_multi"])]
    return model, graph, x_r, x_c, edges, circuits


@torch.no_grad()  # a decorator, not a global switch: isolate=False runs this in the caller's process
def _in_process(method, args):
    from probegen.patching.evaluate import kl
    from probegen.patching.hooks import HookPatcher
    model, graph, x_r, x_c, edges, circuits = _gpt2_workload(args)
    d = kl()
    t0 = time.perf_counter()
    if method == "hooks":
        hp = HookPatcher(model, x_r, x_c)
        ref = model(x_r).logits
        run_edges = lambda: [d(ref, hp.output_without({e})) for e in edges]
        run_multi = lambda: [d(ref, hp.output_with(c)) for c in circuits]
    else:
        from probegen.patching.paths import edge_patch
        patcher = Patcher(graph, x_r, x_c)
        ref = patcher.ref[graph.output]
        edge_hyps = [edge_patch(graph, s, r) for s, r in edges]
        multi_hyps = [Hypothesis(tuple(edge_closure(graph, c))) for c in circuits]
        run_edges = lambda: [d(ref, out) for out in patcher.outputs(edge_hyps, chunk=args["chunk"])]
        run_multi = lambda: [d(ref, out) for out in patcher.outputs(multi_hyps, chunk=args["chunk"])]
    _sync(args["device"])
    res = {"setup_s": time.perf_counter() - t0}
    for kind, fn in (("edge", run_edges), ("multi", run_multi)):
        kls, seconds = _timed(lambda: [k.cpu() for k in fn()])
        res.update({f"{kind}_kl": kls, f"{kind}_s": seconds, f"{kind}_n": len(kls)})
    res["multi_paths"] = float(np.mean([len(edge_closure(graph, c)) for c in circuits]))
    res["peak_mb"] = _peak_mb(args["device"])
    return res


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process' peak RSS (Linux: KiB)


def bench_gpt2_interleaved(seq=64, pairs=16, n_edge=8, n_multi=8, seed=0, device="cpu", size=None):
    """The same workload as bench_gpt2, both methods in one process, alternating hypothesis by hypothesis
    (engine one at a time), so that a shared machine's changing load falls on both alike: hypotheses/s."""
    args = dict(seq=seq, pairs=pairs, n_edge=n_edge, n_multi=n_multi, chunk=1, seed=seed, device=device,
                size=size or GPT2_SMALL)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_interleaved, args).result()


@torch.no_grad()
def _interleaved(args):
    from probegen.patching.evaluate import kl
    from probegen.patching.hooks import HookPatcher
    from probegen.patching.paths import edge_patch
    model, graph, x_r, x_c, edges, circuits = _gpt2_workload(args)
    d = kl()
    hooks, patcher = HookPatcher(model, x_r, x_c), Patcher(graph, x_r, x_c)
    ref = patcher.ref[graph.output]
    work = {"edge": [(edge_patch(graph, s, r), {(s, r)}, hooks.output_without) for s, r in edges],
            "multi": [(Hypothesis(tuple(edge_closure(graph, c))), c, hooks.output_with) for c in circuits]}
    out = {}
    for kind, items in work.items():
        t_engine = t_hooks = diff = 0.0
        for hyp, hyp_edges, hooked in items:
            a, dt = _timed(lambda: d(ref, patcher.output(hyp)).cpu())
            t_engine += dt
            b, dt = _timed(lambda: d(ref, hooked(hyp_edges)).cpu())
            t_hooks += dt
            diff = max(diff, float((a - b).abs().max()))
        out.update({f"gpt2_{kind}_engine_hyps_per_s": len(items) / t_engine,
                    f"gpt2_{kind}_hooks_hyps_per_s": len(items) / t_hooks,
                    f"gpt2_{kind}_speedup": t_hooks / t_engine, f"gpt2_{kind}_max_abs_diff": diff})
    return out
