"""Metrics: accuracy, Kendall's tau-b, parameter counts."""

import numpy as np
import torch


def accuracy(logits, y):
    """logits (N, C), y (N,) integer labels -> fraction of argmax hits."""
    logits, y = torch.as_tensor(logits), torch.as_tensor(y)
    return (logits.argmax(-1) == y).float().mean().item()


def kendall_tau(x, y):
    """Kendall's tau-b, ties included, equal to scipy.stats.kendalltau's statistic (the same integer counts
    and the same final expression); nan when undefined (n < 2, a NaN, or x or y constant).

    Counted here rather than by scipy because importing scipy.stats costs 2 s, more than a whole training
    stage of the embedded CNN zoo spends on its validations. O(n log^2 n): discordant pairs are the
    inversions of y once the pairs are sorted by x (then y), counted by a vectorised merge sort."""
    x, y = _numpy(x), _numpy(y)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau: x and y differ in size ({x.size} vs {y.size})")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    order = np.lexsort((y, x))  # by x, ties in x by y: a pair tied in x is never an inversion of y
    x, y = x[order], y[order]
    n = x.size
    pairs = n * (n - 1) // 2
    x_ties, y_ties = _tied_pairs(x), _tied_pairs(y)
    both_ties = _tied_pairs(np.cumsum(np.r_[True, (x[1:] != x[:-1]) | (y[1:] != y[:-1])]))  # equal (x, y)
    discordant = _inversions(np.unique(y, return_inverse=True)[1])
    # concordant - discordant, from: pairs = concordant + discordant + x_ties + y_ties - both_ties
    con_minus_dis = pairs - x_ties - y_ties + both_ties - 2 * discordant
    tau = con_minus_dis / np.sqrt(pairs - x_ties) / np.sqrt(pairs - y_ties)
    return float(min(1.0, max(-1.0, tau)))


def _tied_pairs(v):
    """Pairs of equal values in v."""
    counts = np.unique(v, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _inversions(a):
    """Pairs i < j with a[i] > a[j], for integers a in [0, n): a bottom-up merge sort whose every level is
    a few whole-array numpy calls. Before the level of width w, each run of w values is sorted; each value
    of a run's right half counts the left-half values above it, then the pairs of halves merge."""
    n, at = a.size, np.arange(a.size)
    a, count, width = a.astype(np.int64), 0, 1
    while width < n:
        block = at // (2 * width)  # the merge each position takes part in
        key = block * n + a  # keys of one block lie below the next block's, so one sort merges them all
        right = (at // width) % 2 == 1
        left_keys = key[~right]  # sorted: blocks in order, each left half sorted
        block_end = np.searchsorted(left_keys, (block[right] + 1) * n)
        first_above = np.searchsorted(left_keys, key[right], side="right")
        count += int((block_end - first_above).sum())
        a = np.sort(key) - block * n  # every block stays in its place, now sorted
        width *= 2
    return count


def _numpy(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return np.asarray(a, dtype=np.float64).ravel()


def count_params(module):
    """Trainable parameters (requires_grad) of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
