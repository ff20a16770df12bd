"""Architecture families: the declared weight structure and a batched forward for all models at once.

A family module (siren.py, small_cnn.py, wild_park.py) defines, for an `arch` dict from spec["archs"]:

    layout(arch) -> Layout                     the layers, their shapes, activations and symmetries
                                               (probegen/nets/layout.py); param_shapes and every per-layer
                                               view derive from it
    input_shape(arch) -> tuple                 one probe's shape, e.g. (2,) or (1, 32, 32)
    output_dim(arch) -> int                    e.g. 1 for an INR, 10 logits for a CNN
    forward(arch, weights, x) -> (B, K, out)   weights (B, D >= num_params), x (K, *input_shape) shared
    reference_module(arch, row) -> nn.Module   one model rebuilt from a packed row (for tests)

and registers itself in FAMILIES. `forward(arch, ...)` never loops over models in Python.
"""

import json

import numpy as np

import torch

from probegen.errors import ProbegenError

FAMILIES = {}


def register(name):
    def deco(module_like):
        FAMILIES[name] = module_like
        return module_like
    return deco


def get_family(name):
    _load_all()
    if name not in FAMILIES:
        raise ProbegenError(f"unknown architecture family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def get_layout(family, arch):
    """The declared Layout of one architecture of a family (cached: families build it from the arch)."""
    key = (family, json.dumps(arch, sort_keys=True))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = get_family(family).layout(arch)
    return _LAYOUTS[key]


_LAYOUTS = {}


def num_params(family, arch):
    return get_layout(family, arch).num_params


def param_shapes(family, arch):
    """[(state-dict name, shape)] in packed order: each layer's weight, then its bias."""
    return get_layout(family, arch).param_shapes


def per_layer(family, archs, weights, arch_ids):
    """A batch's per-layer view, grouped by architecture, for weight-space methods:
    [(arch index, rows (b,) long, Layout, [(W (b, *weight), b (b, out))])] for each architecture present."""
    if len(archs) == 1:  # no data-dependent branch (vmap over seeds needs none)
        lay = get_layout(family, archs[0])
        return [(0, torch.arange(weights.shape[0], device=weights.device), lay, lay.split(weights))]
    groups, present = [], torch.unique(arch_ids).tolist()
    for a in present:
        rows = torch.nonzero(arch_ids == a).squeeze(1)
        lay = get_layout(family, archs[a])
        groups.append((a, rows, lay, lay.split(weights if len(present) == 1 else weights[rows])))
    return groups


def load_row(module, row):
    """Fill a freshly built reference module from one packed row (numpy or tensor, possibly zero-padded on
    the right): the row is its parameters flattened in state_dict order."""
    n = sum(p.numel() for p in module.parameters())
    row = torch.as_tensor(np.asarray(row[:n])) if not torch.is_tensor(row) else row[:n]
    row = row.detach().to("cpu", torch.float32, copy=True)  # a copy: rows may be read-only memmaps
    torch.nn.utils.vector_to_parameters(row, module.parameters())
    return module


def forward_zoo(family, archs, arch_ids, weights, x):
    """Forward a batch that may mix architectures: one batched call per architecture present.

    archs: spec["archs"]; arch_ids: (B,) long; weights: (B, D); x: (K, *input_shape) -> (B, K, out).
    """
    fam = get_family(family)
    if len(archs) == 1:  # no data-dependent branch: also what lets a method be vmapped over seeds
        return fam.forward(archs[0], weights, x)
    present = torch.unique(arch_ids)
    if len(present) == 1:
        return fam.forward(archs[int(present[0])], weights, x)
    out = None
    for a in present.tolist():
        rows = torch.nonzero(arch_ids == a).squeeze(1)
        y = fam.forward(archs[a], weights[rows], x)  # (b, K, out)
        if out is None:
            out = y.new_zeros((weights.shape[0], *y.shape[1:]))
        out[rows] = y
    return out


def _load_all():
    # Importing a family module registers it.
    from probegen.nets import siren, small_cnn, wild_park  # noqa: F401
