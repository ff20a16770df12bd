"""Tiny architecture families and in-memory zoos for method and training tests (no files, no real nets).

    tiny_mlp    f(x) = W2 tanh(W1 x + b1) + b2, input (in,), output (out,); archs may differ in hidden size
    tiny_image  f(x) = W mean_hw(x) + b, input (C, 32, 32), output (out,)

A zoo is separable by construction: each model's output bias b2 / b encodes its label, so every method
(probing or weight-space) can learn it.
"""

import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probegen.nets.layout import Layer, Layout
from probegen.zoo.packed import PackedZoo, ragged


def _mlp_layout(arch):
    i, h, o = arch["in"], arch["hidden"], arch["out"]
    return Layout([Layer("l1", "linear", (h, i), "tanh"), Layer("l2", "linear", (o, h))])


def _mlp_forward(arch, weights, x):
    (W1, b1), (W2, b2) = _mlp_layout(arch).split(weights)
    h = torch.tanh(torch.einsum("ki,bhi->bkh", x, W1) + b1[:, None])  # (B, K, h)
    return torch.einsum("bkh,boh->bko", h, W2) + b2[:, None]  # (B, K, out)


def _image_layout(arch):
    return Layout([Layer("fc", "linear", (arch["out"], arch["channels"]))])


def _image_forward(arch, weights, x):
    ((W, b),) = _image_layout(arch).split(weights)
    pooled = x.mean((2, 3))  # (K, C)
    return torch.einsum("kc,boc->bko", pooled, W) + b[:, None]


TINY_MLP = types.SimpleNamespace(
    input_shape=lambda arch: (arch["in"],), output_dim=lambda arch: arch["out"],
    layout=_mlp_layout, forward=_mlp_forward)
TINY_IMAGE = types.SimpleNamespace(
    input_shape=lambda arch: (arch["channels"], 32, 32), output_dim=lambda arch: arch["out"],
    layout=_image_layout, forward=_image_forward)


def register_tiny(monkeypatch):
    from probegen import nets
    nets.get_family("siren")  # load the real families first, so ours are added, not replaced
    monkeypatch.setitem(nets.FAMILIES, "tiny_mlp", TINY_MLP)
    monkeypatch.setitem(nets.FAMILIES, "tiny_image", TINY_IMAGE)


def family(name):
    from probegen.nets import get_family
    return {"tiny_mlp": TINY_MLP, "tiny_image": TINY_IMAGE}.get(name) or get_family(name)


def num_params(name, arch):
    return family(name).layout(arch).num_params


def make_zoo(family_name, archs, n, task="classification", num_classes=3, seed=0, arch_ids=None, signal=1.0,
             std=0.5):
    """n random models (weights N(0, std)); label-dependent output bias. Stored ragged, as a packed zoo is."""
    rng = np.random.default_rng(seed)
    arch_ids = np.asarray(arch_ids if arch_ids is not None else np.arange(n) % len(archs), dtype=np.int64)
    fam = family(family_name)
    sizes = [num_params(family_name, a) for a in archs]
    rows = []
    if task == "classification":
        labels = rng.integers(0, num_classes, n).astype(np.int64)
        target = labels.astype(np.float32)
    else:
        labels = rng.uniform(0, 1, n).astype(np.float32)
        target = labels * 3
    for i, a in enumerate(arch_ids):
        d = sizes[a]
        row = rng.normal(0, std, d).astype(np.float32)
        out = fam.output_dim(archs[a])
        row[d - out:] = signal * target[i] + rng.normal(0, 0.1, out)  # the output bias is last
        rows.append(row)
    spec = {"family": family_name, "task": task, "num_classes": num_classes if task == "classification" else None,
            "archs": list(archs), "format": "fake", "num_models": n}
    meta = pd.DataFrame({"id": [f"m{i}" for i in range(n)], "arch": arch_ids})
    return PackedZoo(Path("."), ragged(np.concatenate(rows), [len(r) for r in rows]), labels, meta, spec)


def split_of(n, val=0.2, test=0.2, seed=0):
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(n * val), int(n * test)
    return {"val": perm[:n_val].tolist(), "test": perm[n_val:n_val + n_test].tolist(),
            "train": perm[n_val + n_test:].tolist()}


# Two shared zoo shapes of the graph-network tests: two tiny MLP architectures, and a mixed Wild Park zoo
# (a residual into a narrower layer, five activations, two depths).
TWO_MLPS = [{"in": 2, "hidden": 5, "out": 1}, {"in": 2, "hidden": 3, "out": 1}]
MIXED_WILD_PARK = [{"in_channels": 1, "channels": c, "kernel_size": k, "stride": [1] * len(c),
                    "padding": [x // 2 for x in k], "residual": r, "activation": a, "num_classes": 2}
                   for c, k, r, a in (([2, 3, 2], [3, 1, 3], [-1, -1, 0], ["relu", "tanh", "gelu"]),
                                      ([3, 2], [5, 3], [-1, -1], ["sigmoid", "none"]))]


def whole_batch(zoo):
    """Every model of a fake zoo as one batch: (weights (N, D), arch_ids (N,))."""
    return zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())
