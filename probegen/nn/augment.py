"""Train-time weight-space augmentation (the neural-graphs recipe), an option of the weight-space methods.

Every model of a batch gets its own random draw, computed on the per-layer views of its layout:

    INRs (a first linear layer on 2-D coordinates):
      translation  f(x) -> f(x + t), t ~ U(-0.25, 0.25)^2:  b_0 += W_0 t  (the same function, moved)
      rotation     f(x) -> f(R x), angle ~ U(-45, 45) deg:  W_0 <- W_0 R
      scale        W_0 *= s, s ~ U(0.8, 1.2)                (a change of frequency)
    every family:
      noise        W += 0.1 std(W) n, n ~ N(0, 1) elementwise, per tensor and model
      dropout      each entry zeroed with p = 0.01, the rest scaled by 1 / (1 - p)

Differences from neural-graphs' code, on purpose: its INR noise adds the constant 0.1 std(W) instead of
noise (a bug inherited from DWSNets; its CNN code adds proper noise, as here), and its translation is
sometimes pushed through a random number of layers, which is not a translation of the input.
"""

import math

import torch

from probegen.nets import per_layer

TRANSLATION, ROTATION_DEG, SCALE = 0.25, 45.0, 0.2
NOISE, DROPOUT = 0.1, 0.01


def augment(family, archs, weights, arch_ids, generator=None):
    """Rows (B, D) -> augmented rows (B, D); padding beyond each model stays zero. Random numbers come from
    `generator` (CPU) so that a seeded run is reproducible on any device."""
    out = weights.clone()
    for _, rows, lay, layers in per_layer(family, archs, weights, arch_ids):
        layers = [(W.clone(), b.clone()) for W, b in layers]
        first = lay.layers[0]
        if first.kind == "linear" and first.units_in == 2:  # coordinates in, as an INR
            layers[0] = _move_input(*layers[0], generator)
        layers = [(_noise_and_drop(W, generator), _noise_and_drop(b, generator)) for W, b in layers]
        out[rows, :lay.num_params] = lay.flatten(layers).to(out.dtype)
    return out


def _uniform(shape, low, high, generator, like):
    return (torch.rand(shape, generator=generator) * (high - low) + low).to(like.device, like.dtype)


def _move_input(W, b, generator):
    """W (B, h, 2), b (B, h): translate, rotate and scale the input of each model."""
    B = W.shape[0]
    t = _uniform((B, 2), -TRANSLATION, TRANSLATION, generator, W)
    b = b + torch.einsum("bhi,bi->bh", W, t)
    angle = _uniform((B,), -ROTATION_DEG, ROTATION_DEG, generator, W) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    R = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    scale = _uniform((B, 1, 1), 1 - SCALE, 1 + SCALE, generator, W)
    return (W @ R) * scale, b


def _noise_and_drop(t, generator):
    """t (B, ...): per-model Gaussian noise at 0.1 of the tensor's std, then dropout."""
    if t[0].numel() > 1:  # a single bias has no spread to scale the noise by (neural-graphs skips it too)
        std = t.flatten(1).std(1).view(-1, *[1] * (t.dim() - 1))
        t = t + NOISE * std * torch.randn(t.shape, generator=generator).to(t.device, t.dtype)
    keep = (torch.rand(t.shape, generator=generator) >= DROPOUT).to(t.device, t.dtype)
    return t * keep / (1 - DROPOUT)
