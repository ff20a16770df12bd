"""Tiny architecture families and in-memory zoos for method and training tests (no files, no real nets).

    tiny_mlp    f(x) = W2 tanh(W1 x + b1) + b2, input (in,), output (out,); archs may differ in hidden size
    tiny_image  f(x) = W mean_hw(x) + b, input (C, 32, 32), output (out,)

A zoo is separable by construction: each model's output bias b2 / b encodes its label, so every method
(probing or weight-space) can learn it.
"""

import math
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probegen.zoo.packed import PackedZoo, ragged


def _mlp_shapes(arch):
    i, h, o = arch["in"], arch["hidden"], arch["out"]
    return [("l1.weight", (h, i)), ("l1.bias", (h,)), ("l2.weight", (o, h)), ("l2.bias", (o,))]


def _split(shapes, weights):
    out, start = [], 0
    for _, shape in shapes:
        size = math.prod(shape)
        out.append(weights[:, start:start + size].reshape(weights.shape[0], *shape))
        start += size
    return out


def _mlp_forward(arch, weights, x):
    W1, b1, W2, b2 = _split(_mlp_shapes(arch), weights)
    h = torch.tanh(torch.einsum("ki,bhi->bkh", x, W1) + b1[:, None])  # (B, K, h)
    return torch.einsum("bkh,boh->bko", h, W2) + b2[:, None]  # (B, K, out)


def _image_shapes(arch):
    return [("fc.weight", (arch["out"], arch["channels"])), ("fc.bias", (arch["out"],))]


def _image_forward(arch, weights, x):
    W, b = _split(_image_shapes(arch), weights)
    pooled = x.mean((2, 3))  # (K, C)
    return torch.einsum("kc,boc->bko", pooled, W) + b[:, None]


TINY_MLP = types.SimpleNamespace(
    input_shape=lambda arch: (arch["in"],), output_dim=lambda arch: arch["out"],
    param_shapes=_mlp_shapes, forward=_mlp_forward)
TINY_IMAGE = types.SimpleNamespace(
    input_shape=lambda arch: (arch["channels"], 32, 32), output_dim=lambda arch: arch["out"],
    param_shapes=_image_shapes, forward=_image_forward)


def register_tiny(monkeypatch):
    from probegen import nets
    nets.get_family("siren")  # load the real families first, so ours are added, not replaced
    monkeypatch.setitem(nets.FAMILIES, "tiny_mlp", TINY_MLP)
    monkeypatch.setitem(nets.FAMILIES, "tiny_image", TINY_IMAGE)


def family(name):
    from probegen.nets import get_family
    return {"tiny_mlp": TINY_MLP, "tiny_image": TINY_IMAGE}.get(name) or get_family(name)


def num_params(name, arch):
    return sum(math.prod(s) for _, s in family(name).param_shapes(arch))


def make_zoo(family_name, archs, n, task="classification", num_classes=3, seed=0, arch_ids=None, signal=1.0):
    """n random models; label-dependent output bias. Stored ragged, as a packed zoo is."""
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
        row = rng.normal(0, 0.5, d).astype(np.float32)
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
