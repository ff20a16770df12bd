"""Metrics: accuracy, Kendall's tau-b (equal to scipy.stats.kendalltau, ties included), parameter counts."""

import math

import numpy as np
import torch


def accuracy(logits, y):
    """logits (N, C), y (N,) integer labels -> fraction of argmax hits."""
    logits, y = torch.as_tensor(logits), torch.as_tensor(y)
    return (logits.argmax(-1) == y).float().mean().item()


def kendall_tau(x, y):
    """Kendall's tau-b in O(n log^2 n), vectorised; nan when undefined (n < 2 or x or y constant).

    tau_b = (concordant - discordant) / sqrt((n0 - n1) (n0 - n2)), n0 = n(n-1)/2, n1 / n2 = pairs tied in
    x / y. Sorting by (x, y) leaves every discordant pair as a strict inversion of y, so
    concordant - discordant = n0 - n1 - n2 + n3 - 2 * inversions, n3 = pairs tied in both.
    """
    x, y = _numpy(x), _numpy(y)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau: x and y differ in size ({x.size} vs {y.size})")
    n = x.size
    if n < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    order = np.lexsort((y, x))  # by x, then y
    x, y = x[order], y[order]
    n0 = n * (n - 1) // 2
    n1 = _tied_pairs(x)
    n3 = _tied_pairs(x, y)
    y_rank = np.unique(y, return_inverse=True)[1].ravel()  # dense ranks 0..u-1
    n2 = _tied_pairs(np.sort(y_rank))
    if n0 == n1 or n0 == n2:
        return float("nan")
    diff = n0 - n1 - n2 + n3 - 2 * _inversions(y_rank)
    return float(diff / math.sqrt((n0 - n1) * (n0 - n2)))


def _numpy(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return np.asarray(a, dtype=np.float64).ravel()


def _tied_pairs(*sorted_keys):
    """Pairs of equal entries (equal in every key) in arrays sorted so that equal rows are adjacent."""
    n = sorted_keys[0].size
    new = np.zeros(n, dtype=bool)
    new[0] = True
    for k in sorted_keys:
        new[1:] |= k[1:] != k[:-1]
    runs = np.diff(np.flatnonzero(np.append(new, True)))  # run lengths
    return int((runs * (runs - 1) // 2).sum())


def _inversions(r):
    """Number of pairs i < j with r[i] > r[j] (integer ranks in [0, n)), bottom-up merge counting.

    At width w, each block of 2w holds a sorted left and right half; every right element counts the left
    elements of its block above it. Each pair is counted once, at the first level that joins it.
    """
    n = r.size
    pos = np.arange(n)
    m = n + 1  # key stride: block * m + value keeps blocks apart
    total, w = 0, 1
    while w < n:
        half = pos // w
        a = np.sort(half * m + r) - half * m  # every half-block sorted, blocks in place
        block = pos // (2 * w)
        keys = block * m + a
        right = (pos % (2 * w)) >= w
        left_keys = keys[~right]  # globally sorted
        above = np.searchsorted(left_keys, block[right] * m + n, side="right") \
            - np.searchsorted(left_keys, keys[right], side="right")
        total += int(above.sum())
        w *= 2
    return total


def count_params(module):
    """Trainable parameters (requires_grad) of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
