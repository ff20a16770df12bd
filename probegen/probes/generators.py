"""Where the K probes come from: deep linear generators (ProbeGen), free parameters (vanilla), fixed tensors.

ProbeGen's generator is *deep linear*: no activation between layers, so G(z) is an affine map of the
latent z (REFERENCE §1). Only the image generator ends in a tanh, which keeps probes in the zoo's input
range [-1, 1]; `affine(z)` exposes the output before it.

    MLPGenerator        INR coordinates:  Linear(32, 32) -> Linear(32, 2), unbounded
    ConvGenerator       32x32 images: transposed convolutions, bias on, tanh at the end
    FreeProbes          K x input_shape free parameters (tanh for images)
    FixedProbes         a buffer, never trained
"""

import torch
import torch.nn.functional as F
from torch import nn

from probegen.errors import ProbegenError


def conv_layer_specs(layers, latent_dim, width, out_channels):
    """(in, out, kernel, stride, padding) per transposed conv; spatial size 1 -> 4 -> 8 -> 16 (-> 16) -> 32 -> 32."""
    nz, w = latent_dim, width
    head = [(nz, 8 * w, 4, 1, 0), (8 * w, 4 * w, 4, 2, 1), (4 * w, 2 * w, 4, 2, 1)]
    if layers == 6:  # CIFAR10-GS: an extra 3x3 layer at 16x16
        return head + [(2 * w, 2 * w, 3, 1, 1), (2 * w, w, 4, 2, 1), (w, out_channels, 3, 1, 1)]
    if layers == 5:  # Wild Park
        return head + [(2 * w, w, 4, 2, 1), (w, out_channels, 3, 1, 1)]
    raise ProbegenError(f"ConvGenerator: layers must be 5 or 6, got {layers!r}")


class MLPGenerator(nn.Module):
    """Deep linear MLP: z (K, latent_dim) -> probes (K, out_dim)."""

    def __init__(self, out_dim, latent_dim=32, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Linear(hidden, out_dim))

    def affine(self, z):
        return self.net(z)

    def forward(self, z):
        return self.affine(z)  # coordinates are unbounded: no output squashing


class ConvGenerator(nn.Module):
    """Deep linear transposed-conv generator: z (K, latent_dim) -> tanh(...) (K, out_channels, 32, 32)."""

    def __init__(self, out_channels, layers=6, latent_dim=32, width=16):
        super().__init__()
        specs = conv_layer_specs(layers, latent_dim, width, out_channels)
        convs = [nn.ConvTranspose2d(c_in, c_out, k, s, p, bias=True) for c_in, c_out, k, s, p in specs]
        self.net = nn.Sequential(*convs)  # no activation in between: the whole stack is affine in z

    def affine(self, z):
        """(K, latent_dim) -> (K, C, 32, 32). The map is offset + z @ linear: with more probes than latent
        dimensions it is formed once, the offset as the net's output at z = 0 and the linear part as its
        bias-free layers on the latent_dim basis vectors, then applied as one matmul: latent_dim + 1
        generator passes instead of K (4x fewer FLOPs at K = 128, forward and backward). The same affine
        map either way (tests/probes/test_generators.py); only float rounding differs."""
        K, nz = z.shape
        if K <= nz + 1:
            return self.layer_by_layer(z)
        offset = self.layer_by_layer(z.new_zeros(1, nz))  # (1, C, 32, 32): every bias carried to the output
        linear = torch.eye(nz, dtype=z.dtype, device=z.device).view(nz, nz, 1, 1)
        for conv in self.net:
            linear = F.conv_transpose2d(linear, conv.weight, None, conv.stride, conv.padding, conv.output_padding,
                                        conv.groups, conv.dilation)  # (nz, c, h, w): column i = the image of e_i
        return offset + (z @ linear.flatten(1)).view(K, *offset.shape[1:])

    def layer_by_layer(self, z):
        """The same map, each of the K latents through every layer: (K, latent_dim) -> (K, C, 32, 32)."""
        return self.net(z.view(*z.shape, 1, 1))

    def forward(self, z):
        return torch.tanh(self.affine(z))


class FreeProbes(nn.Module):
    """Vanilla probing: the K probes themselves are parameters (init N(0, 1)); tanh keeps images in range."""

    def __init__(self, num_probes, shape, bounded):
        super().__init__()
        self.raw = nn.Parameter(torch.randn(num_probes, *shape))
        self.bounded = bounded

    def forward(self):
        return torch.tanh(self.raw) if self.bounded else self.raw  # (K, *shape)


class FixedProbes(nn.Module):
    """Synthetic probes: a fixed tensor, saved with the model but never trained."""

    def __init__(self, probes):
        super().__init__()
        self.register_buffer("fixed", torch.as_tensor(probes, dtype=torch.float32).clone())

    def forward(self):
        return self.fixed  # (K, *shape)


def generator_for(input_shape, latent_dim=32, layers=None, width=16):
    """The generator REFERENCE §1 pairs with a zoo's probe shape.

    (d,) coordinates -> MLPGenerator; (C, 32, 32) images -> ConvGenerator with 6 layers for 1 channel
    (CIFAR10-GS) and 5 for 3 channels (Wild Park) unless `layers` says otherwise.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) == 1:
        return MLPGenerator(input_shape[0], latent_dim=latent_dim, hidden=latent_dim)
    if len(input_shape) == 3 and input_shape[1:] == (32, 32):
        layers = layers or (6 if input_shape[0] == 1 else 5)
        return ConvGenerator(input_shape[0], layers=layers, latent_dim=latent_dim, width=width)
    raise ProbegenError(f"no probe generator for input shape {input_shape}; expected (d,) or (C, 32, 32)")
