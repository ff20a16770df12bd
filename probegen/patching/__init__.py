"""Path patching (Goldowsky-Dill et al. 2023, arXiv 2304.05969).

    g = model.patch_graph()                                   # or graph_from_fx(module), or Graph(...)
    hyp = parse_hypothesis(g, "{emb -> 1.1.q -> out, emb -> 1.1.v -> out, emb -> 0.0 -> 1.1.k -> out}")
    rows = evaluate(g, [hyp], x_r, x_c, metric="kl")         # AUE, ATE, proportion explained, bootstrap CI

Modules: graph (nodes, slots, torch.fx import), paths (paths and hypotheses as strings), engine (fast and
brute-force patched runs, activation patching), evaluate (metrics and scoring), transformer (the
attention-only model and a hand-built induction model), induction (the induction analysis), bench.
Real models: hf (graph_from_hf: Hugging Face GPT-2) and lens (graph_from_lens: TransformerLens 3.x), built by lm;
hooks (one hooked forward per hypothesis, the baseline), tracr_port (compiled ground truth), gpt2_numbers.
"""

from probegen.patching.engine import Patcher, activation_patch
from probegen.patching.evaluate import bootstrap, evaluate, kl, loss_increase, squared_error, summarize
from probegen.patching.graph import Graph, Node, graph_from_fx
from probegen.patching.hf import graph_from_hf
from probegen.patching.hooks import HookPatcher
from probegen.patching.lens import graph_from_lens
from probegen.patching.lm import LMGraph
from probegen.patching.paths import (ANY, EVERYTHING, NOTHING, Hypothesis, Path, all_paths, edge_patch,
                                     node_patch, parse_hypothesis, parse_path, paths_through)

__all__ = ["ANY", "EVERYTHING", "NOTHING", "Graph", "Hypothesis", "Node", "Path", "Patcher", "activation_patch",
           "all_paths", "bootstrap", "edge_patch", "evaluate", "graph_from_fx", "kl", "loss_increase", "node_patch",
           "parse_hypothesis", "parse_path", "paths_through", "squared_error", "summarize"]
__all__ += ["HookPatcher", "LMGraph", "graph_from_hf", "graph_from_lens"]
