"""The Small CNN Zoo family (Unterthiner et al. 2020): the CIFAR10-GS zoo and the embedded digits_cnn zoo.

    arch = {"in_channels": 1, "channels": [16, 16, 16], "kernel": 3, "stride": 2, "padding": 0,
            "num_classes": 10, "activation": "relu" | "tanh"}

Keras' build_cnn: three Conv2D(16, 3x3, stride 2, 'valid') each followed by the activation, global
average pooling, Dense(10) logits. A 1x32x32 input goes 32 -> 15 -> 7 -> 3. The activation is part of
the arch, so a zoo of relu and tanh runs has two archs.

Parameters are packed in the reference module's state_dict order, PyTorch layout:
convs.0.weight (16, 1, 3, 3), convs.0.bias (16), convs.1.*, convs.2.*, fc.weight (10, 16), fc.bias (10)
= 4,970 numbers. (The published weights.npy is in TensorFlow layout; zoo/formats/small_cnn_zoo.py converts.)
The family registers this module itself in probegen.nets.FAMILIES under "small_cnn".
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from probegen.errors import ProbegenError
from probegen.nets import get_layout, load_row, register
from probegen.nets.layout import Layer, Layout

IMAGE_SIZE = 32
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
ARCH_KEYS = ("in_channels", "channels", "kernel", "stride", "padding", "num_classes", "activation")


def zoo_arch(activation):
    """The Small CNN Zoo architecture with the given activation."""
    return check_arch({"in_channels": 1, "channels": [16, 16, 16], "kernel": 3, "stride": 2, "padding": 0,
                       "num_classes": 10, "activation": activation})


def check_arch(arch):
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ProbegenError(f"small_cnn arch lacks {missing}")
    if arch["activation"] not in ACTIVATIONS:
        raise ProbegenError(f"small_cnn arch: unknown activation {arch['activation']!r}; "
                            f"known: {sorted(ACTIVATIONS)}")
    return arch


def input_shape(arch):
    return (arch["in_channels"], IMAGE_SIZE, IMAGE_SIZE)


def output_dim(arch):
    return arch["num_classes"]


def layout(arch):
    """convs.0 .. convs.{L-1} (each followed by the activation), global average pooling, then fc; the
    channels of each conv permute freely (pooling keeps them apart, fc reads them as its inputs)."""
    k, layers, c_in = arch["kernel"], [], arch["in_channels"]
    for i, c in enumerate(arch["channels"]):
        layers.append(Layer(f"convs.{i}", "conv", (c, c_in, k, k), check_arch(arch)["activation"]))
        c_in = c
    return Layout(layers + [Layer("fc", "linear", (arch["num_classes"], c_in))])


def param_shapes(arch):
    return get_layout("small_cnn", arch).param_shapes


def feature_sizes(arch, size=IMAGE_SIZE):
    """Spatial side of the input and of every conv output, e.g. [32, 15, 7, 3]."""
    sizes = [size]
    for _ in arch["channels"]:
        sizes.append((sizes[-1] + 2 * arch["padding"] - arch["kernel"]) // arch["stride"] + 1)
    return sizes


def unflatten(arch, weights):
    """(B, D) -> [(W, b) per conv] + [(W_fc, b_fc)], each with a leading B; views into the rows."""
    return get_layout("small_cnn", arch).split(weights)


def apply(arch, layers, x, keep=None, generator=None):
    """The batched network on stacked parameters (what forward and the digits_cnn trainer share).

    layers: unflatten's list, leading dim B. x: (K, C, H, W) shared by all models, or (B, K, C, H, W).
    keep: optional (B,) keep probabilities: inverted dropout after every conv activation, as Keras'
    Dropout layer (training only). Returns logits (B, K, num_classes).
    """
    act = ACTIVATIONS[check_arch(arch)["activation"]]
    B = layers[0][0].shape[0]
    s, p = arch["stride"], arch["padding"]
    if x.dim() == 4:
        # Shared input: the first conv is one ordinary conv with B*c output channels, no groups.
        h, groups = x, 1
    else:
        K, C, side_h, side_w = x.shape[1:]
        h, groups = x.transpose(0, 1).reshape(K, B * C, side_h, side_w), B  # (K, B*C, H, W)
    for W, b in layers[:-1]:
        # Model m's channels are the m-th block of B*c; groups=B keeps the models apart.
        h = F.conv2d(h, W.reshape(-1, *W.shape[2:]), b.reshape(-1), stride=s, padding=p, groups=groups)
        h = act(h)  # (K, B*c, h, w)
        if keep is not None:
            h = _dropout(h, keep, generator)
        groups = B
    K = h.shape[0]
    pooled = h.reshape(K, B, -1, h.shape[-2] * h.shape[-1]).mean(-1)  # (K, B, c)
    W_fc, b_fc = layers[-1]
    return torch.baddbmm(b_fc.unsqueeze(1), pooled.transpose(0, 1), W_fc.transpose(1, 2))  # (B, K, out)


def _dropout(h, keep, generator):
    """Inverted dropout with each model's keep probability: h (K, B*c, h, w), keep (B,)."""
    K, B = h.shape[0], keep.shape[0]
    n = h[0].numel() // B  # units per model and example
    # 16 random bits per unit, drawn four at a time as full-range int64 words: ~3x cheaper than
    # torch.rand, and these elementwise passes over the layer-1 activations are much of a training step.
    words = torch.empty((K, B, (n + 3) // 4), dtype=torch.int64, device=h.device)
    bits = words.random_(-2 ** 63, None, generator=generator).view(torch.int16)[..., :n]  # (K, B, n)
    level = torch.round(keep * 65536).clamp(1, 65536)  # keep probability in steps of 1/65536
    mask = bits <= (level - 32769).to(torch.int16).view(1, B, 1)  # P(keep) = level / 65536
    return h * (mask * (65536 / level).view(1, B, 1)).view(h.shape)


def forward(arch, weights, x):
    """All B models at once: weights (B, D >= 4970), x (K, C, H, W) shared or (B, K, C, H, W) -> (B, K, 10)."""
    return apply(arch, unflatten(arch, weights), x.to(weights.dtype))


class SmallCNN(nn.Module):
    """One model as a plain module; state_dict keys are exactly convs.{i}.weight/bias, fc.weight/bias."""

    def __init__(self, arch):
        super().__init__()
        check_arch(arch)
        widths = [arch["in_channels"], *arch["channels"]]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, arch["kernel"], stride=arch["stride"], padding=arch["padding"])
            for a, b in zip(widths[:-1], widths[1:]))
        self.fc = nn.Linear(widths[-1], arch["num_classes"])
        self.act = ACTIVATIONS[arch["activation"]]

    def forward(self, x):  # (N, C, H, W) -> (N, num_classes)
        for conv in self.convs:
            x = self.act(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


def reference_module(arch, row):
    """Rebuild one model from a packed row (numpy or tensor, possibly zero-padded on the right)."""
    return load_row(SmallCNN(arch), row)


register("small_cnn")(sys.modules[__name__])
