"""Architecture families: a batched functional forward for all models of a zoo batch at once.

A family module (siren.py, small_cnn.py, wild_park.py) defines, for an `arch` dict from spec["archs"]:

    input_shape(arch) -> tuple                 one probe's shape, e.g. (2,) or (1, 32, 32)
    output_dim(arch) -> int                    e.g. 1 for an INR, 10 logits for a CNN
    param_shapes(arch) -> [(name, shape)]      the reference module's state_dict, in packed order
    forward(arch, weights, x) -> (B, K, out)   weights (B, D >= num_params), x (K, *input_shape) shared
    reference_module(arch, row) -> nn.Module   one model rebuilt from a packed row (for tests)

and registers itself in FAMILIES. `forward(arch, ...)` never loops over models in Python.
"""

import math

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


def num_params(family, arch):
    return sum(math.prod(shape) for _, shape in get_family(family).param_shapes(arch))


def layer_params(param_shapes, weights):
    """(B, D) -> [(W (B, *w_shape), b (B, *b_shape))] per layer: views into the packed rows, in
    param_shapes order (weight then bias per layer); zero padding beyond num_params is ignored."""
    params, start = [], 0
    for _, shape in param_shapes:
        size = math.prod(shape)
        params.append(weights[:, start:start + size].reshape(weights.shape[0], *shape))
        start += size
    return list(zip(params[0::2], params[1::2]))


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
