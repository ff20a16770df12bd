"""Scoring hypotheses: AUE, ATE, proportion explained, bootstrap confidence intervals.

    AUE(P) = E d(G(x_r), G_H(x_r, x_c))      unexplained effect of hypothesis P
    ATE    = AUE({}) = E d(G(x_r), G(x_c))   total effect
    proportion explained = 1 - AUE / ATE      1: P carries the behaviour; 0: no better than x_c; can be < 0

A dissimilarity d(ref_out, patched_out) -> (B,) gives one value per (x_r, x_c) pair; the expectation is the
mean over pairs and the bootstrap resamples pairs (the same resample for AUE and ATE).
"""

import numpy as np
import torch.nn.functional as F

from probegen.errors import ProbegenError
from probegen.patching.engine import Patcher
from probegen.patching.paths import NOTHING, parse_hypothesis

# ------------------------------------------------------------------------------------------ dissimilarities


def kl(mask=None):
    """KL(softmax(G(x_r)) || softmax(G_H)) over the last axis, averaged over positions (where mask is True)."""
    def d(ref, out):  # (B, ..., C) logits
        logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
        return _reduce((logp.exp() * (logp - logq)).sum(-1), mask)
    return d


def squared_error(mask=None):
    """Squared error for regression outputs, summed over the last axis when there is more than the batch."""
    def d(ref, out):
        sq = (ref - out) ** 2
        return _reduce(sq.sum(-1) if sq.dim() > 1 else sq, mask)
    return d


def loss_increase(target, loss="ce", mask=None):
    """L(G_H, y) - L(G(x_r), y): signed, so the proportion explained is the recovered share of the loss gap."""
    if loss not in ("ce", "mse"):
        raise ProbegenError(f"loss: expected 'ce' or 'mse', got {loss!r}")

    def per_elem(out):
        if loss == "ce":  # out (B, ..., C), target (B, ...)
            return F.cross_entropy(out.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
        return ((out - target) ** 2).sum(-1) if out.dim() > 1 else (out - target) ** 2

    return lambda ref, out: _reduce(per_elem(out) - per_elem(ref), mask)


def _reduce(x, mask):
    """(B, ...) -> (B,): mean over the non-batch axes, or over the positions where mask (B, ...) is True."""
    if mask is None:
        return x.flatten(1).mean(1) if x.dim() > 1 else x
    mask = mask.to(x.dtype)
    if mask.shape != x.shape:
        raise ProbegenError(f"mask shape {tuple(mask.shape)} != per-position values shape {tuple(x.shape)}")
    return (x * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


METRICS = {"kl": kl, "sq": squared_error}


# --------------------------------------------------------------------------------------------- scoring


def effects(patcher, hyps, d, chunk=8):
    """Per-pair dissimilarity d(G(x_r), G_H) for each hypothesis: (H, B) float64 numpy.
    With a dict {name: d}, each patched output is scored by every d: {name: (H, B)}."""
    ds = d if isinstance(d, dict) else {None: d}
    ref = patcher.ref[patcher.graph.output]
    rows = {k: [] for k in ds}
    for out in patcher.outputs(hyps, chunk):
        for k, fn in ds.items():
            rows[k].append(fn(ref, out).double().cpu().numpy())
    arrays = {k: np.stack(v) if v else np.zeros((0, patcher.batch)) for k, v in rows.items()}
    return arrays if isinstance(d, dict) else arrays[None]


def bootstrap(d_h, d_0, n_boot=1000, seed=0):
    """Bootstrap draws (n_boot,) of AUE and ATE; pairs are resampled jointly (same pairs for both)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d_h), size=(n_boot, len(d_h)))
    return d_h[idx].mean(1), d_0[idx].mean(1)


def summarize(d_h, d_0, n_boot=1000, seed=0, level=0.95):
    """Score one hypothesis from per-pair values d_h (B,) and the total-effect values d_0 (B,)."""
    _check_n_boot(n_boot)
    aue, ate = float(d_h.mean()), float(d_0.mean())
    aue_b, ate_b = bootstrap(d_h, d_0, n_boot, seed)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    row = {"aue": aue, "ate": ate, "aue_ci": np.percentile(aue_b, q).tolist()}
    if ate <= 0 or np.any(ate_b <= 0):
        row.update(explained=None, explained_ci=None)  # no effect to explain: the ratio is undefined
    else:
        row.update(explained=1 - aue / ate, explained_ci=np.percentile(1 - aue_b / ate_b, q).tolist())
    return row


def evaluate(graph, hyps, x_r, x_c, metric="kl", n_boot=1000, seed=0, chunk=8, patcher=None):
    """Score hypotheses (strings or Hypothesis) on pairs (x_r, x_c). Returns one dict per hypothesis:
    {"hypothesis", "aue", "ate", "aue_ci", "explained", "explained_ci"}.

    metric: "kl" (default), "sq", or a callable d(ref_out, patched_out) -> (B,) such as
    loss_increase(target) or kl(mask).
    """
    _check_n_boot(n_boot)
    d = _metric(metric)
    patcher = patcher or Patcher(graph, x_r, x_c)
    hyps = [parse_hypothesis(graph, h) for h in hyps]
    values = effects(patcher, [NOTHING] + hyps, d, chunk)  # row 0: the total effect
    return [{"hypothesis": str(h), **summarize(v, values[0], n_boot, seed)} for h, v in zip(hyps, values[1:])]


def _check_n_boot(n_boot):
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ProbegenError(f"n_boot: expected a positive integer (bootstrap draws), got {n_boot!r}")


def _metric(metric):
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ProbegenError(f"metric: expected one of {sorted(METRICS)} or a callable, got {metric!r}")
    return METRICS[metric]()
