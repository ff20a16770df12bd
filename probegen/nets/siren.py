"""The DWSNets SIREN: the INR family of the MNIST / FMNIST zoos (and the embedded digits zoo).

    arch = {"in_dim": 2, "hidden": [32, 32], "out_dim": 1, "w0": 30.0, "out_bias": 0.5}

    f(x) = W2 sin(w0 (W1 sin(w0 (W0 x + b0)) + b1)) + b2 + out_bias

Parameters are packed in the order of the DWSNets state dict: seq.0.weight (32, 2), seq.0.bias (32),
seq.1.weight (32, 32), seq.1.bias (32), seq.2.weight (1, 32), seq.2.bias (1) = 1,185 numbers.
The family registers this module itself in probegen.nets.FAMILIES under "siren".
"""

import sys

import numpy as np
import torch
from torch import nn

from probegen.nets import get_layout, load_row, register
from probegen.nets.layout import Layer, Layout

DWSNETS_ARCH = {"in_dim": 2, "hidden": [32, 32], "out_dim": 1, "w0": 30.0, "out_bias": 0.5}


def _dims(arch):
    return [arch["in_dim"], *arch["hidden"], arch["out_dim"]]


def input_shape(arch):
    return (arch["in_dim"],)


def output_dim(arch):
    return arch["out_dim"]


def layout(arch):
    """Linear layers seq.0 .. seq.{L-1}; sin(w0 x) after every hidden layer; hidden units permute freely."""
    dims = _dims(arch)
    last = len(dims) - 2
    return Layout(Layer(f"seq.{i}", "linear", (fan_out, fan_in), "none" if i == last else "sin")
                  for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])))


def param_shapes(arch):
    return get_layout("siren", arch).param_shapes


def unflatten(arch, weights):
    """(B, D) -> [(W (B, out, in), b (B, out)) per layer], views into the rows; padding beyond is ignored."""
    return get_layout("siren", arch).split(weights)


def state_dict(arch, row):
    """One packed row (D,) -> {name: tensor view} in state-dict order, e.g. to write a checkpoint."""
    row = torch.as_tensor(row)
    names = [name for name, _ in param_shapes(arch)]
    tensors = [t[0] for layer in unflatten(arch, row.unsqueeze(0)) for t in layer]
    return dict(zip(names, tensors))


def forward(arch, weights, x):
    """All B models at once: weights (B, D), x (K, in_dim) shared or (B, K, in_dim) per model -> (B, K, out)."""
    layers = unflatten(arch, weights)
    B = weights.shape[0]
    h = x.to(weights.dtype)
    if h.dim() == 2:
        h = h.expand(B, *h.shape)  # (B, K, in) view, no copy
    last = len(layers) - 1
    for i, (W, b) in enumerate(layers):
        if i < last:  # sin(w0 (W h + b)) = sin((w0 W) h + w0 b): scale the small weights, not the activations
            W, b = W * arch["w0"], b * arch["w0"]
        # baddbmm fuses the bias add into the batched matmul: (B, K, in) @ (B, in, out) + (B, 1, out)
        h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))  # (B, K, out)
        if i < last:
            h = torch.sin(h)
    return h + arch["out_bias"]


class SirenModule(nn.Module):
    """One SIREN as a plain module; state_dict keys are exactly seq.{i}.weight / seq.{i}.bias."""

    def __init__(self, arch):
        super().__init__()
        dims = _dims(arch)
        self.seq = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.w0, self.out_bias = arch["w0"], arch["out_bias"]

    def forward(self, x):
        for i, layer in enumerate(self.seq):
            x = layer(x)
            if i < len(self.seq) - 1:
                x = torch.sin(self.w0 * x)
        return x + self.out_bias


def reference_module(arch, row):
    """Rebuild one model from a packed row (numpy or tensor, possibly zero-padded on the right)."""
    return load_row(SirenModule(arch), row)


def grid_coords(side=28):
    """(side*side, 2) pixel coordinates in [-1, 1]^2, row-major, as DWSNets' make_coordinates builds them.

    Entry k is (x, y) = (lin[k % side], lin[k // side]): x runs along a row (the column index), y down the
    image, so an output reshaped to (side, side) is the image. np.linspace in float64 then cast, as theirs.
    """
    lin = np.linspace(-1.0, 1.0, side)
    x, y = np.meshgrid(lin, lin)  # 'xy' indexing: x varies along axis 1
    return torch.from_numpy(np.stack([x.ravel(), y.ravel()], axis=1)).float()


register("siren")(sys.modules[__name__])
