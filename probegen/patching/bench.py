"""Throughput of the path-patching engines on the induction model (2 layers x 4 heads, V=64, T=40, d=64).

Two workloads over the model's 169 concrete paths:
  random  sets of 1-8 random concrete paths (mostly emb -> 0.h -> 1.h' -> out: the costly kind)
  greedy  one greedy-refinement round: the induction hypothesis plus each other path in turn
The fast engine is timed batched (`chunk` hypotheses per pass) and one hypothesis at a time, each with a
fresh Patcher (its planning memo starts empty); the brute-force treeified evaluator on a few hypotheses.
Weights are random: speed does not depend on training.
"""

import random
import time

import torch

from probegen.patching.engine import Patcher
from probegen.patching.paths import Hypothesis, all_paths, parse_hypothesis
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
