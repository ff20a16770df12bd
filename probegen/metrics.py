"""Metrics: accuracy, Kendall's tau-b (scipy), parameter counts."""

import numpy as np
import torch


def accuracy(logits, y):
    """logits (N, C), y (N,) integer labels -> fraction of argmax hits."""
    logits, y = torch.as_tensor(logits), torch.as_tensor(y)
    return (logits.argmax(-1) == y).float().mean().item()


def kendall_tau(x, y):
    """Kendall's tau-b (scipy.stats.kendalltau, ties included); nan when undefined (n < 2, a NaN, or x or y
    constant). Evaluated once per validation, never in a training step."""
    x, y = _numpy(x), _numpy(y)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau: x and y differ in size ({x.size} vs {y.size})")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    import scipy.stats  # here, not at the top: importing scipy.stats costs every stage process 1 s

    return float(scipy.stats.kendalltau(x, y).statistic)


def _numpy(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return np.asarray(a, dtype=np.float64).ravel()


def count_params(module):
    """Trainable parameters (requires_grad) of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
