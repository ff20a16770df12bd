"""Path patching on the trained ProbeGen predictors (localize@<zoo>): which probes, and which layers of the
probed networks, carry the prediction.

Pairs are TEST models: a reference w_r and a counterfactual w_c of the same architecture with another label
(classification: another class; regression: a test accuracy at least two quartiles away). The behaviour is
the predictor's output on w_r; d is the KL of the softmaxes (classification) or the squared error of the
predicted value (regression). Two graphs over one predictor:

    probe graph   leaves r0..r{K-1} = the responses f_w(p_k) (B, out) -> head (one slot per probe)
                  S = a probe subset: hypothesis {rk -> head.rk : k in S}
    layer graph   leaves layer0..layer{L-1} = the probed network's per-layer parameters -> net (the family's
                  own batched forward on all K probes, one slot per layer) -> head
                  "layer l uses the reference weights": {layer_l -> ...}

The probed families are chains (no skips), so each parameter leaf has exactly one path to the output and
the coarse `net` node gives the same patched runs as a per-layer activation graph would.

Mixing layers of two independently initialised networks is off-distribution (hidden units are only defined
up to permutation), so the counterfactual's hidden units are first aligned to the reference by weight
matching; a reference whose units were permuted at random, used as the counterfactual, must then give
AUE = 0 for every layer hypothesis (the sanity check), while the unaligned mix does not. Alignment removes
only that symmetry: independently trained networks stay far apart after it (reported per layer as
`distance_ratio_after_alignment`), so the layer results are given for aligned and, for contrast, raw
counterfactuals.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from probegen.errors import ProbegenError  # noqa: E402
from probegen.io import atomic_dir, read_json, write_json  # noqa: E402
from probegen.methods.base import zoo_rows  # noqa: E402
from probegen.nets import get_family, get_layout  # noqa: E402
from probegen.nets.layout import take  # noqa: E402
from probegen.patching.engine import Patcher  # noqa: E402
from probegen.patching.evaluate import METRICS, effects, summarize  # noqa: E402
from probegen.patching.graph import Graph, Node  # noqa: E402
from probegen.patching.paths import EVERYTHING, NOTHING, parse_hypothesis, parse_path  # noqa: E402


@dataclass
class LocalizeConfig:
    seed: int = 0  # which of its seeds (models/<zoo>/<method>/seed-<seed>.pt); also seeds pairs and bootstrap
    n_pairs: int = 256
    n_boot: int = 500
    target: float = 0.9  # the greedy probe set stops at this proportion explained
    top_probes: int = 8  # probes in the interaction matrix

    @classmethod
    def from_params(cls, section):
        """params.yaml `localize:` -> config; one clear line for an unknown key or a bad value."""
        section = dict(section or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise ProbegenError(f"params.yaml: localize.{unknown[0]}: unknown key (known: {', '.join(names)})")
        cfg = cls(**section)
        for name, low in (("seed", 0), ("n_pairs", 2), ("n_boot", 1), ("top_probes", 2)):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ProbegenError(f"params.yaml: localize.{name}: expected an integer >= {low}, got {v!r}")
        t = cfg.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ProbegenError(f"params.yaml: localize.target: expected a number in (0, 1], got {t!r}")
        return cfg


# --------------------------------------------------------------------------------------- predictor, pairs


def load_predictor(zoo_name, seed, root=".", method="probegen"):
    """A trained probing predictor of a zoo (eval mode) and its packed zoo, as aggregate rebuilds them."""
    from probegen import saved
    from probegen.experiment import run_paths

    path = run_paths(zoo_name, method, seed, root)["model"]
    if not path.exists():
        raise ProbegenError(f"{path}: missing; run probe@{zoo_name}-{method} first")
    predictor, zoo, _ = saved.load_trained(path, root, zoo=zoo_name, method=method, seed=seed)
    return predictor, zoo


def make_pairs(zoo, test_idx, n_pairs, seed):
    """(ref rows, cf rows, rule): n_pairs references drawn from the test models, each with a random
    counterfactual of the same arch and a different label."""
    test = np.asarray(test_idx, dtype=np.int64)
    labels, arch = np.asarray(zoo.labels)[test], zoo.arch_ids[test]
    if zoo.task == "classification":
        differs, rule = labels[:, None] != labels[None, :], "different class, same architecture"
    else:
        # Neighbouring quartiles can hold near-equal accuracies; two quartiles apart always differ.
        quartile = np.searchsorted(np.quantile(labels, [0.25, 0.5, 0.75]), labels, side="right")  # 0..3
        differs = np.abs(quartile[:, None] - quartile[None, :]) >= 2
        rule = "test accuracies at least two quartiles apart, same architecture"
    ok = differs & (arch[:, None] == arch[None, :])  # (n_test, n_test)
    valid = np.flatnonzero(ok.any(1))
    if len(valid) == 0:
        raise ProbegenError(f"split test: no two test models of one architecture differ in label ({rule})")
    rng = np.random.default_rng(seed)
    # every valid test model once per round, so with more pairs than models the references stay balanced
    refs = np.concatenate([rng.permutation(valid) for _ in range(-(-n_pairs // len(valid)))])[:n_pairs]
    cfs = np.array([rng.choice(np.flatnonzero(ok[i])) for i in refs])
    return test[refs], test[cfs], rule


@torch.no_grad()
def responses(method, weights, arch_ids, chunk=64):
    """method.responses in row chunks: (B, D), (B,) -> (B, K, out); a probed CNN's activations grow with B x K."""
    return torch.cat([method.responses(w, a) for w, a in zip(weights.split(chunk), arch_ids.split(chunk))])


def metric_for(task):
    return "kl" if task == "classification" else "sq"


# ------------------------------------------------------------------------------------------- probe graph


def probe_graph(head, num_probes):
    """Leaves r0..r{K-1} (each (B, out)) -> head, one slot per probe; the raw input is responses (B, K, out)."""
    names = [f"r{k}" for k in range(num_probes)]

    def fn(**slots):  # concatenated in probe order = responses.flatten(1), what the head was trained on
        return head(torch.cat([slots[n] for n in names], -1))

    return Graph(names, [Node("head", fn, {n: (n,) for n in names})], "head",
                 embed=lambda r: {n: r[:, k] for k, n in enumerate(names)})


def probe_hypothesis(graph, probes):
    """The paths through the responses of the given probes."""
    return parse_hypothesis(graph, [parse_path(graph, f"r{k} -> head.r{k}") for k in probes])


class ProbeMixer:
    """Closed form of the probe-graph patched run, for many subsets at once:
    G_S = head(where(k in S, r_ref, r_cf)). The head's first layer is linear, so its pre-activation is
    z_cf + sum_{k in S} delta_k with delta_k = W1[:, probe k] (r_ref - r_cf)_k; only the rest of the head runs
    per subset. Equals the engine's run up to float rounding (tested)."""

    def __init__(self, head, r_ref, r_cf):
        first, self.rest = head.net[0], head.net[1:]
        B, K, out = r_ref.shape
        self.num_probes = K
        with torch.no_grad():
            self.z_cf = first(r_cf.flatten(1))  # (B, H)
            W = first.weight.view(-1, K, out)  # (H, K, out)
            # contiguous: einsum returns a permuted view, and gathering candidate rows from it is ~50x slower
            self.delta = torch.einsum("bko,hko->kbh", r_ref - r_cf, W).contiguous()  # (K, B, H)

    @torch.no_grad()
    def outputs(self, masks):
        """masks (M, K) 0/1 -> patched outputs (M, B, C)."""
        return self.rest(self.z_cf + torch.einsum("mk,kbh->mbh", masks.to(self.delta.dtype), self.delta))

    @torch.no_grad()
    def extend(self, z, candidates):
        """Pre-activation z (B, H) of a subset S -> outputs (C, B, out) of S + {k} for each candidate k."""
        return self.rest(z + self.delta[candidates])


def _per_pair(d, ref_out, outs):
    """d over stacked patched outputs (M, B, C) -> (M, B)."""
    M, B = outs.shape[:2]
    return d(ref_out.expand(M, *ref_out.shape).reshape(M * B, -1), outs.reshape(M * B, -1)).view(M, B)


def greedy_probes(mixer, d, ref_out, target, screen=8, chunk=32):
    """Greedy forward selection: add the probe whose addition lowers the mean AUE most, until the proportion
    explained reaches `target` (or every probe is in). Returns the probes in the order they were added.

    Exact evaluation of every candidate costs (K - |S|) x B head runs per step; with `screen` set, each
    step first ranks all candidates by a first-order estimate (attribution patching: the gradient of the
    mean AUE at the current pre-activation, dotted with each probe's delta; one backward pass) and
    evaluates only the best `screen` of them exactly. screen=None: every candidate, exactly."""
    K = mixer.num_probes
    z = mixer.z_cf.clone()
    ate = _per_pair(d, ref_out, mixer.rest(z)[None]).mean().item()
    chosen = []
    while len(chosen) < K and ate > 0:
        left = torch.tensor([k for k in range(K) if k not in chosen])
        if screen is not None and len(left) > screen:
            left = left[_first_order(mixer, d, ref_out, z)[left].argsort()[:screen]]
        aue = torch.cat([_per_pair(d, ref_out, mixer.extend(z, part)).mean(1) for part in left.split(chunk)])
        best = int(left[aue.argmin()])
        chosen.append(best)
        z = z + mixer.delta[best]
        if 1 - aue.min().item() / ate >= target:
            break
    return chosen


def _first_order(mixer, d, ref_out, z):
    """Estimated change of the mean AUE when probe k joins S, for every k: grad_z AUE . delta_k -> (K,)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(d(ref_out, mixer.rest(z)).mean(), z)  # (B, H)
    return mixer.delta.flatten(1) @ grad.flatten()


def analyse_probes(method, r_ref, r_cf, metric, *, target, top_probes, n_boot, seed, screen=8):
    """Analyses 1 and 3: the greedy smallest probe set, reference curves, single probes and interactions.
    The greedy search runs on the closed form; every reported number is the engine's, with bootstrap CIs
    (the search and the scores use the same pairs)."""
    K = r_ref.shape[1]
    graph = probe_graph(method.head, K)
    patcher = Patcher(graph, r_ref, r_cf)
    d = METRICS[metric]()

    def score(hyps):  # engine-scored rows, the same bootstrap resample for every hypothesis
        values = effects(patcher, [NOTHING] + hyps, d, chunk=16)
        return [summarize(v, values[0], n_boot, seed) for v in values[1:]]

    ref_out = patcher.ref[graph.output]
    order = greedy_probes(ProbeMixer(method.head, r_ref, r_cf), d, ref_out, target, screen=screen)
    greedy = score([probe_hypothesis(graph, order[:n]) for n in range(len(order) + 1)])
    single = score([probe_hypothesis(graph, [k]) for k in range(K)])
    ranked = np.argsort([-(r["explained"] or 0.0) for r in single], kind="stable").tolist()
    shuffled = np.random.default_rng(seed).permutation(K).tolist()
    sizes = _curve_sizes(K)
    by_rank = score([probe_hypothesis(graph, ranked[:n]) for n in sizes])
    by_random = score([probe_hypothesis(graph, shuffled[:n]) for n in sizes])
    # the search stopped on closed-form means; allow their float rounding against the engine's
    reached = [n for n, r in enumerate(greedy) if (r["explained"] or 0.0) >= target - 1e-6]
    top = ranked[:min(top_probes, K)]
    pair_rows = score([probe_hypothesis(graph, [i, j]) for a, i in enumerate(top) for j in top[a + 1:]])
    return {
        "ate": greedy[0]["ate"],
        "greedy_screen": screen,
        "greedy": [{"size": n, "added": order[n - 1] if n else None, **r} for n, r in enumerate(greedy)],
        "selected": order[:reached[0]] if reached else order,
        "smallest_size": reached[0] if reached else None,  # None: no effect to explain (ATE = 0)
        "single": [{"probe": k, **r} for k, r in enumerate(single)],
        "curve_sizes": sizes,
        "by_single_rank": [r["explained"] for r in by_rank],
        "random_order": [r["explained"] for r in by_random],
        "interactions": _interactions(top, single, pair_rows),
    }


def _curve_sizes(K):
    """|S| = 0, 1, 2, 3, 4, 6, 8, ... K: dense where curves rise fastest."""
    sizes = {0, K} | {min(K, int(round(2 ** (e / 2)))) for e in range(2 * int(math.log2(max(K, 1))) + 2)}
    return sorted(sizes)


def _interactions(top, single, pair_rows):
    """Pairwise proportion explained minus the two single-probe values: > 0 synergy, < 0 redundancy."""
    n = len(top)
    pe = lambda r: r["explained"] if r["explained"] is not None else float("nan")
    pair, inter, rows = np.full((n, n), np.nan), np.full((n, n), np.nan), iter(pair_rows)
    for a in range(n):
        for b in range(a + 1, n):
            pair[a, b] = pair[b, a] = pe(next(rows))
            inter[a, b] = inter[b, a] = pair[a, b] - pe(single[top[a]]) - pe(single[top[b]])
    tolist = lambda m: [[None if np.isnan(v) else float(v) for v in row] for row in m]
    return {"probes": top, "single": [pe(single[k]) for k in top], "pair": tolist(pair), "interaction": tolist(inter)}


# ------------------------------------------------------------------------------------------- layer graph


def layer_units(family, arch):
    """[(name, start, end)]: the probed network's layers (its declared layout) as column ranges of a
    packed row, e.g. ('seq.0', 0, 96)."""
    units, start = [], 0
    lay = get_layout(family, arch)
    for layer, w, b in zip(lay.layers, lay.sizes[0::2], lay.sizes[1::2]):
        units.append((layer.name, start, start + w + b))
        start += w + b
    return units


def layer_graph(method, arch, probes, chunk=64):
    """Leaves = the probed network's layers by name ('seq.0', ...) -> net (the family's forward on all
    probes, one slot per layer) -> head; the raw input is (B, D) rows."""
    fam, units = get_family(method.family), layer_units(method.family, arch)
    leaves = [name for name, _, _ in units]

    def net(**slots):  # (N, d_l) per layer -> responses (N, K, out); in row chunks to bound activations
        w = torch.cat([slots[n] for n in leaves], 1)  # (N, D_arch), packed order
        return torch.cat([fam.forward(arch, part, probes) for part in w.split(chunk)])

    nodes = [Node("net", net, {n: (n,) for n in leaves}),
             Node("head", lambda r: method.head(r.flatten(1)), {"r": ("net",)})]
    return Graph(leaves, nodes, "head", embed=lambda w: {n: w[:, s:e] for n, s, e in units})


def layer_hypotheses(graph):
    """{name: hypothesis}: layer l alone from the reference, every layer but l, and every layer."""
    hyps = {}
    for leaf in graph.inputs:
        hyps[f"only:{leaf}"] = parse_hypothesis(graph, f"{{{leaf} -> ...}}")
        hyps[f"all_but:{leaf}"] = parse_hypothesis(graph, f"{{...}} - {{{leaf} -> ...}}")
    hyps["all"] = EVERYTHING
    return hyps


def layer_names(method, arch_ids):
    """Layer names of the pairs' architectures, in network order; a zoo of mixed depths (Wild Park: 2-5
    convolutions) gives the union, each layer then scored on the pairs whose architecture has it."""
    lists = sorted((tuple(n for n, _, _ in layer_units(method.family, method.archs[a])) for a in np.unique(arch_ids)),
                   key=len, reverse=True)
    names = list(lists[0])
    for other in lists[1:]:
        names += [n for n in other if n not in names]
    return names


def layer_effects(method, w_ref, w_cf, arch_ids, metric):
    """Per-pair d for NOTHING and every layer hypothesis: {name: (B,)}, NaN where the pair's architecture
    has no such layer. One graph per architecture present (the family's math depends on it)."""
    probes = method.probes().detach().float()
    d, out = METRICS[metric](), {}
    for a in np.unique(arch_ids):
        rows = np.flatnonzero(arch_ids == a)
        graph = layer_graph(method, method.archs[a], probes)
        hyps = {"none": NOTHING, **layer_hypotheses(graph)}
        values = effects(Patcher(graph, w_ref[rows], w_cf[rows]), list(hyps.values()), d, chunk=1)
        for name, v in zip(hyps, values):
            out.setdefault(name, np.full(len(arch_ids), np.nan))[rows] = v
    return out


def score_layers(values, names, n_boot, seed):
    """{none, only:<layer>, all_but:<layer>, all: (B,)} -> rows per layer with bootstrap CIs, each over the
    pairs whose architecture has that layer."""
    def s(key):
        have = ~np.isnan(values[key])
        return {"pairs": int(have.sum()), **summarize(values[key][have], values["none"][have], n_boot, seed)}

    return {"ate": float(values["none"].mean()),
            "only": [{"layer": n, **s(f"only:{n}")} for n in names],
            "all_but": [{"layer": n, **s(f"all_but:{n}")} for n in names],
            "all": s("all")}


# ------------------------------------------------------------------------------------- neuron alignment


def align(family, arch, w_ref, w_cf, sweeps=10):
    """Weight matching (Ainsworth et al. 2023, 'Git Re-Basin'): permute each counterfactual's hidden units to
    the reference's, within the symmetry the layout declares (tied residual channels move together).

    Coordinate descent over the ties: each step is one linear assignment (scipy) per tie and row, on the
    summed similarity of the tie's channels over every layer they appear in, given the other permutations.
    The first sweep goes in network order on incoming weights + biases only (the outgoing side is not
    aligned yet), using a layer once the permutation of its inputs is known; later sweeps add the outgoing
    weights. Returns (aligned rows (B, D), perms [(B, width)] per hidden layer)."""
    lay = get_layout(family, arch)
    A, C = lay.split(w_ref), lay.split(w_cf)
    B = w_ref.shape[0]
    perms = [torch.arange(lay.layers[l].units_out).expand(B, -1).contiguous() for l in lay.hidden]
    ties = sorted(lay.ties().items(), key=lambda kv: (kv[1][0][0], kv[1][0][1].start))  # network order
    for sweep in range(sweeps + 1):
        changed, done = False, set()
        for tie, members in ties:
            used = members if sweep else [  # the first sweep: only layers whose input permutation is final
                (l, s) for l, s in members if l == 0 or all(t in done for t in _ties_of(lay, l - 1))]
            sim = sum(_similarity(A, C, perms, l, outgoing=sweep > 0)[:, s.start:s.end, s.start:s.end]
                      for l, s in used)
            local = _assign(sim)  # (B, n)
            for l, s in members:
                new = local + s.start
                changed |= not torch.equal(new, perms[l][:, s.start:s.end])
                perms[l][:, s.start:s.end] = new
            done.add(tie)
        if sweep > 0 and not changed:
            break
    return lay.permute(w_cf, perms), perms


def _ties_of(lay, l):
    return {s.tie for s in lay.segments[l]}


def _similarity(A, C, perms, l, outgoing):
    """(B, h, h): ref unit i vs cf unit j of hidden layer l, as inner products of their weights."""
    W_in = C[l][0] if l == 0 else take(C[l][0], perms[l - 1], 2)  # (B, h, in, ...) inputs in ref order
    sim = A[l][0].flatten(2) @ W_in.flatten(2).transpose(1, 2) + A[l][1][:, :, None] * C[l][1][:, None, :]
    if outgoing:
        W_out = C[l + 1][0] if l + 1 == len(perms) else take(C[l + 1][0], perms[l + 1], 1)  # (B, out, h, ...)
        a, c = A[l + 1][0].transpose(1, 2).flatten(2), W_out.transpose(1, 2).flatten(2)  # (B, h, out * ...)
        sim = sim + a @ c.transpose(1, 2)
    return sim


def _assign(sim):
    """Per row, the permutation maximising sum_i sim[i, perm[i]]: (B, h, h) -> (B, h)."""
    return torch.stack([torch.from_numpy(linear_sum_assignment(s, maximize=True)[1]) for s in sim.numpy()])


def _by_arch(arch_ids):
    """(arch index, rows tensor) for each architecture present."""
    return [(a, torch.from_numpy(np.flatnonzero(arch_ids == a))) for a in np.unique(arch_ids)]


def align_rows(method, w_ref, w_cf, arch_ids):
    """align() per architecture present: the aligned counterfactual rows (B, D)."""
    aligned = w_cf.clone()
    for a, rows in _by_arch(arch_ids):
        aligned[rows] = align(method.family, method.archs[a], w_ref[rows], w_cf[rows])[0]
    return aligned


def distance_ratio(method, w_ref, w_cf, aligned, arch_ids):
    """Per layer, mean over pairs of ||ref - aligned|| / ||ref - cf||: how much closer alignment brings them."""
    ratios = {}
    for a, rows in _by_arch(arch_ids):
        for name, s, e in layer_units(method.family, method.archs[a]):
            before = (w_ref[rows, s:e] - w_cf[rows, s:e]).norm(dim=1)
            after = (w_ref[rows, s:e] - aligned[rows, s:e]).norm(dim=1)
            ratios.setdefault(name, []).append(after / before.clamp_min(1e-12))
    return {name: float(torch.cat(r).mean()) for name, r in ratios.items()}


def random_permutation(family, archs, w, arch_ids, seed):
    """Rows w (B, D) with their hidden units permuted at random, within each layout's symmetry."""
    gen, permuted = torch.Generator().manual_seed(seed), w.clone()
    for a, rows in _by_arch(arch_ids):
        lay = get_layout(family, archs[a])
        permuted[rows] = lay.permute(w[rows], lay.random_permutation(len(rows), gen))
    return permuted


def analyse_layers(method, w_ref, w_cf, arch_ids, metric, *, n_boot, seed, sanity_pairs=64):
    """Analysis 2 on aligned counterfactuals (and raw ones, to show the off-distribution cost), after the
    permuted-reference sanity check on the first `sanity_pairs` references has passed."""
    sanity = permutation_sanity(method, w_ref[:sanity_pairs], arch_ids[:sanity_pairs], metric, seed)
    names = layer_names(method, arch_ids)
    aligned = align_rows(method, w_ref, w_cf, arch_ids)
    return {"layers": names,
            "aligned": score_layers(layer_effects(method, w_ref, aligned, arch_ids, metric), names, n_boot, seed),
            "raw": score_layers(layer_effects(method, w_ref, w_cf, arch_ids, metric), names, n_boot, seed),
            "distance_ratio_after_alignment": distance_ratio(method, w_ref, w_cf, aligned, arch_ids),
            "sanity": sanity}


SANITY_TOLERANCE = 1e-6  # largest AUE, relative to the total effect, that a same-function mix may show


def permutation_sanity(method, w_ref, arch_ids, metric, seed):
    """Counterfactual = the reference with its hidden units permuted at random (the same function). After
    alignment every layer hypothesis must give AUE = 0 (else a ProbegenError: the alignment or the declared
    symmetry is wrong); mixed without alignment it need not, and the raw AUEs are reported for contrast."""
    permuted = random_permutation(method.family, method.archs, w_ref, arch_ids, seed)
    gap = float(_output_gap(method, w_ref, permuted, arch_ids))
    aligned = align_rows(method, w_ref, permuted, arch_ids)
    fixed = layer_effects(method, w_ref, aligned, arch_ids, metric)
    raw = layer_effects(method, w_ref, permuted, arch_ids, metric)
    aue = {k: float(np.nanmean(v)) for k, v in fixed.items() if k != "none"}
    scale = max(float(np.nanmean(raw[k])) for k in raw if k != "none")
    worst = max(aue, key=aue.get)
    if gap > 1e-4 or aue[worst] > SANITY_TOLERANCE * max(scale, 1.0):
        raise ProbegenError(f"localize: the permuted-reference sanity check failed ({method.family}: "
                            f"function changed by {gap:.2g}, AUE of {worst} after alignment {aue[worst]:.2g}); "
                            "the declared symmetry or the alignment is wrong")
    return {"pairs": len(w_ref), "function_max_abs_diff": gap,
            # < 1: a unit with a near-duplicate (e.g. two dead ReLU channels) may be matched to its twin
            "aligned_exact_fraction": float((aligned == w_ref).all(1).double().mean()),
            "aligned_max_abs_weight_diff": float((aligned - w_ref).abs().max()),
            "aue_aligned": aue,
            "aue_raw": {k: float(np.nanmean(v)) for k, v in raw.items() if k != "none"}}


@torch.no_grad()
def _output_gap(method, w_a, w_b, arch_ids):
    ids = torch.from_numpy(arch_ids)
    return (responses(method, w_a, ids) - responses(method, w_b, ids)).abs().max()


# ------------------------------------------------------------------------------------------------- stage


def localize_stage(zoo_name, cfg, probe_methods, root="."):
    """localize@<zoo>: analyse the first probing method of `methods.probe` (`-S 'methods.probe=[vanilla]'`
    localizes vanilla), seed cfg.seed; if that seed was not trained, write a note. -> a one-line summary."""
    from probegen.experiment import run_paths

    root = Path(root)
    method = probe_methods[0]
    if not run_paths(zoo_name, method, cfg.seed, root)["model"].exists():
        note = f"{method} seed {cfg.seed} was not trained (localize.seed must be one of seeds)"
        write_json(root / f"metrics/localize/{zoo_name}.json", {"zoo": zoo_name, "skipped": note})
        with atomic_dir(root / f"plots/localize/{zoo_name}"):
            pass  # an empty folder: the stage's declared output
        return f"localize {zoo_name}: skipped, {note}"
    out = run_localize(zoo_name, cfg.seed, method=method, n_pairs=cfg.n_pairs, n_boot=cfg.n_boot,
                       target=cfg.target, top_probes=cfg.top_probes, root=root)
    layers = ", ".join(f"{r['layer']} {r['explained']:.2f}" for r in out["layers"]["aligned"]["only"]
                       if r["explained"] is not None)
    return (f"localize {zoo_name} ({out['method']} seed {cfg.seed}): {out['probes']['smallest_size']} of "
            f"{out['num_probes']} probes explain >= {cfg.target:.0%}; single layers from the reference: {layers}")


def run_localize(zoo_name, seed, *, n_pairs, n_boot, target, top_probes=8, root=".", threads=1, method="probegen"):
    """All three analyses on the trained predictor models/<zoo>/<method>/seed-<seed>.pt; writes
    metrics/localize/<zoo>.json and plots/localize/<zoo>/ under root, returns the metrics dict.
    threads: torch threads while it runs (0 = leave torch's setting)."""
    with _torch_threads(threads):
        return _run_localize(zoo_name, seed, method, n_pairs, n_boot, target, top_probes, Path(root))


@contextlib.contextmanager
def _torch_threads(n):
    # Most ops here are small (B x 256 matmuls, elementwise on (B, 10)): on a busy 2-core box, 2 threads ran
    # the digits_inr stage in 60 s and 1 thread in 16 s (digits_cnn, convolutions included: 73 s vs 44 s).
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run_localize(zoo_name, seed, method_name, n_pairs, n_boot, target, top_probes, root):
    method, zoo = load_predictor(zoo_name, seed, root, method_name)
    split_path = root / f"data/splits/{zoo_name}.json"
    if not split_path.exists():
        raise ProbegenError(f"{split_path}: missing; run split@{zoo_name} first")
    ref_idx, cf_idx, rule = make_pairs(zoo, read_json(split_path)["test"], n_pairs, seed)
    metric = metric_for(zoo.task)
    w_ref, w_cf = zoo_rows(zoo, ref_idx), zoo_rows(zoo, cf_idx)
    arch_ids = zoo.arch_ids[ref_idx]
    with torch.no_grad():
        r_ref = responses(method, w_ref, torch.from_numpy(arch_ids))
        r_cf = responses(method, w_cf, torch.from_numpy(arch_ids))
        probes = analyse_probes(method, r_ref, r_cf, metric, target=target, top_probes=top_probes,
                                n_boot=n_boot, seed=seed)
        layers = analyse_layers(method, w_ref, w_cf, arch_ids, metric, n_boot=n_boot, seed=seed)
    result = {"zoo": zoo_name, "method": method_name, "seed": seed, "task": zoo.task, "metric": metric,
              "target": target, "num_probes": method.num_probes, "n_pairs": n_pairs, "pair_rule": rule,
              "pairs_per_arch": {str(a): int((arch_ids == a).sum()) for a in np.unique(arch_ids)},
              "distinct_references": int(len(np.unique(ref_idx))),
              "probes": probes, "layers": layers}
    with torch.no_grad():
        p = method.probes().detach().cpu().numpy()
    with atomic_dir(root / f"plots/localize/{zoo_name}") as out:
        plot_explained(probes, target, out / "probes_explained.png", zoo_name)
        plot_selected(p, probes, zoo, out / "probes_selected.png", zoo_name)
        plot_layers(layers, out / "layers.png", zoo_name)
        plot_interactions(probes["interactions"], out / "interactions.png", zoo_name)
    write_json(root / f"metrics/localize/{zoo_name}.json", result)  # no timings: same inputs, same bytes
    return result


# ------------------------------------------------------------------------------------------------- plots


def plot_explained(probes, target, path, zoo_name):
    """Proportion explained vs |S|: greedy (95% CI), top-|S| single probes, a random order."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    g = probes["greedy"]
    sizes = [r["size"] for r in g]
    ax.plot(sizes, [r["explained"] for r in g], "o-", ms=3, color="C0", label="greedy")
    ci = np.array([r["explained_ci"] or [np.nan, np.nan] for r in g])
    ax.fill_between(sizes, ci[:, 0], ci[:, 1], color="C0", alpha=0.2)
    ax.plot(probes["curve_sizes"], probes["by_single_rank"], "s--", ms=3, color="C1", label="top-|S| single probes")
    ax.plot(probes["curve_sizes"], probes["random_order"], "^:", ms=3, color="C7", label="random order")
    ax.axhline(target, color="k", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, probes["curve_sizes"][-1] * 1.15)
    ax.set_xlabel("|S| (probes whose responses come from the reference)")
    ax.set_ylabel("proportion explained")
    n = probes["smallest_size"]
    ax.set_title(f"{zoo_name}: smallest greedy S = {n if n is not None else '> K'}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_selected(all_probes, probes, zoo, path, zoo_name, max_show=32):
    """The selected probes in greedy order: INR coordinates over the zoo's mean image; images as a grid."""
    sel = probes["selected"][:max_show] or [probes["greedy"][1]["added"]]
    title = f"{zoo_name}: greedy probes ({len(probes['selected'])} to reach the target)"
    if all_probes.ndim == 2:
        _plot_coords(all_probes, sel, zoo, path, title)
    else:
        _plot_images(all_probes, sel, path, title)


def mean_inr_image(zoo, side=28, n=256):
    """The mean of up to n of the zoo's INRs rendered on a side x side grid -> (side, side) array."""
    from probegen.nets import forward_zoo
    from probegen.nets.siren import grid_coords

    idx = np.arange(0, len(zoo), max(1, len(zoo) // n))
    with torch.no_grad():
        img = forward_zoo(zoo.family, zoo.archs, torch.as_tensor(zoo.arch_ids[idx]),
                          zoo.weights[idx], grid_coords(side))  # (b, side^2, 1)
    return img.mean(0).reshape(side, side).numpy()


def _plot_coords(all_probes, sel, zoo, path, title):
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    # grid_coords entry k is (x = lin[k % side], y = lin[k // side]): image rows are y, downwards.
    ax.imshow(mean_inr_image(zoo), cmap="gray", extent=(-1, 1, 1, -1))
    ax.scatter(all_probes[:, 0], all_probes[:, 1], s=6, c="C0", alpha=0.4, label="all probes")
    ax.scatter(all_probes[sel, 0], all_probes[sel, 1], s=22, c="C1", label="selected")
    for rank, k in enumerate(sel):
        ax.annotate(str(rank + 1), all_probes[k], fontsize=6, color="C1", xytext=(2, 2), textcoords="offset points")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(1.5, -1.5)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_images(all_probes, sel, path, title):
    cols = int(np.ceil(np.sqrt(len(sel))))
    rows = int(np.ceil(len(sel) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(sel):
            img = np.transpose(all_probes[sel[i]], (1, 2, 0))
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
            ax.set_title(f"#{i + 1}: p{sel[i]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(layers, path, zoo_name):
    """Per layer: proportion explained with only that layer from the reference, and with all but it."""
    names = layers["layers"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 3.6))
    bars = [("aligned", "only", "C0", "only l from ref (aligned)"),
            ("aligned", "all_but", "C2", "all but l from ref (aligned)"),
            ("raw", "only", "C7", "only l from ref (unaligned)")]
    width = 0.8 / len(bars)
    for i, (kind, which, color, label) in enumerate(bars):
        rows = layers[kind][which]
        vals = np.array([r["explained"] if r["explained"] is not None else np.nan for r in rows])
        ci = np.array([r["explained_ci"] or [np.nan, np.nan] for r in rows])
        err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
        ax.bar(x + (i - 1) * width, vals, width, yerr=err, capsize=2, color=color, label=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(1, color="k", lw=0.6, ls="--")
    ax.set_xticks(x, names)
    ax.set_xlabel("layer of the probed network")
    ax.set_ylabel("proportion explained")
    ax.set_title(f"{zoo_name}: which layers carry the prediction", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_interactions(inter, path, zoo_name):
    """Top probes: single proportion explained on the diagonal, pair minus singles off it."""
    m = np.array([[np.nan if v is None else v for v in row] for row in inter["interaction"]])
    np.fill_diagonal(m, inter["single"])
    n = len(inter["probes"])
    fig, ax = plt.subplots(figsize=(0.5 * n + 2.5, 0.5 * n + 1.8))
    off = m[~np.eye(n, dtype=bool)]
    lim = max(1e-6, float(np.nanmax(np.abs(off)))) if off.size else 1.0
    im = ax.imshow(np.where(np.eye(n, dtype=bool), np.nan, m), cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(n):
        for j in range(n):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3f}" if i == j else f"{m[i, j]:+.1e}", ha="center", va="center",
                        fontsize=5, fontweight="bold" if i == j else "normal")
    labels = [f"p{k}" for k in inter["probes"]]
    ax.set_xticks(range(n), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(n), labels, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, label="PE(pair) - PE(i) - PE(j)")
    ax.set_title(f"{zoo_name}: probe interactions (diagonal: single PE)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
