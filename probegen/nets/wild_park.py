"""The CNN Wild Park family: Neural Graphs' `CNN` (experiments/cnn_generalization/dataset/cnn_sampler.py).

    arch = {"in_channels": 3, "channels": [c1..cL], "kernel_size": [k1..kL], "stride": [s1..sL],
            "padding": [p1..pL], "residual": [r1..rL], "activation": [a1..aL], "num_classes": 10}

Every field is per layer because the zoo generator samples each layer independently. Layer i computes

    h_i = act_i(conv_i(h_{i-1}) + R_i),   R_i = h_r on the first min(c_r, c_i) channels if r = residual[i] >= 0

i.e. the residual is the *post-activation* output of an earlier layer r (never the preceding one), added
*before* layer i's activation, only on the channels both layers share; then global average pooling and
fc = Linear(c_L, num_classes). Activations are the original's names: relu, gelu (exact erf), tanh,
sigmoid, leaky_relu (slope 0.01, PyTorch's default), none (identity). The zoo uses stride 1 and padding
k // 2, so every feature map stays 32x32. Inputs are CIFAR-10 images normalized with CIFAR10_MEAN/STD
(`normalize`); the forward takes already-normalized inputs, as the trained modules did.

Parameters are packed in the order of the checkpoint's state dict: layers.{i}.weight (c_i, c_{i-1}, k, k),
layers.{i}.bias (c_i), ..., fc.weight (num_classes, c_L), fc.bias (num_classes).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from probegen.errors import ProbegenError
from probegen.nets import get_layout, load_row, register
from probegen.nets.layout import Layer, Layout

# torchvision's Normalize constants of the zoo's training data (generate_cnn_park_config/data/cifar10.yaml)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
IMAGE_SIZE = 32
ARCH_KEYS = ("in_channels", "channels", "kernel_size", "stride", "padding", "residual", "activation",
             "num_classes")

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
    "none": lambda x: x,
}


def normalize(images):
    """(..., 3, H, W) RGB in [0, 1] -> the normalized inputs the zoo was trained on."""
    mean = images.new_tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = images.new_tensor(CIFAR10_STD).view(3, 1, 1)
    return (images - mean) / std


def arch_from_config(cfg):
    """The checkpoint's `config` (a plain dict of CNNConfig fields) -> a validated arch dict."""
    keys = ("n_layers", "n_classes", "channels", "kernel_size", "stride", "padding", "residual", "activation")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ProbegenError(f"config lacks {missing}")
    channels = list(cfg["channels"])
    arch = {"in_channels": channels[0] if channels else None, "channels": channels[1:],
            "kernel_size": list(cfg["kernel_size"]), "stride": list(cfg["stride"]),
            "padding": list(cfg["padding"]), "residual": list(cfg["residual"]),
            "activation": list(cfg["activation"]), "num_classes": cfg["n_classes"]}
    if cfg["n_layers"] != len(arch["channels"]):
        raise ProbegenError(f"config n_layers={cfg['n_layers']} but {len(arch['channels'])} layer widths")
    return check_arch(arch)


def to_config(arch):
    """Inverse of arch_from_config: the CNNConfig fields, as the zoo generator stored them."""
    return {"n_layers": len(arch["channels"]), "n_classes": arch["num_classes"],
            "channels": [arch["in_channels"], *arch["channels"]], "kernel_size": list(arch["kernel_size"]),
            "stride": list(arch["stride"]), "padding": list(arch["padding"]),
            "residual": list(arch["residual"]), "activation": list(arch["activation"])}


def check_arch(arch):
    """Validate an arch dict (the original CNN._assert_cfg rules) and return it with plain ints/strs."""
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ProbegenError(f"arch lacks {missing}")
    L = len(arch["channels"])
    if L < 1:
        raise ProbegenError("a Wild Park CNN needs at least one conv layer")
    for key in ("kernel_size", "stride", "padding", "residual", "activation"):
        if len(arch[key]) != L:
            raise ProbegenError(f"{key} has {len(arch[key])} entries for {L} layers")
    ints = {k: [int(v) for v in arch[k]] for k in ("channels", "kernel_size", "stride", "padding", "residual")}
    if min(ints["channels"] + ints["kernel_size"] + ints["stride"]) < 1 or min(ints["padding"]) < 0:
        raise ProbegenError(f"non-positive width, kernel or stride in {ints}")
    for i, a in enumerate(arch["activation"]):
        if a not in ACTIVATIONS:
            raise ProbegenError(f"unknown activation {a!r} in layer {i}; known: {sorted(ACTIVATIONS)}")
    # Any negative index means "no residual"; a source must be an earlier layer other than the preceding one.
    residual = [max(r, -1) for r in ints["residual"]]
    for i, r in enumerate(residual):
        if r >= 0 and not r < i - 1:
            raise ProbegenError(f"layer {i} takes a residual from layer {r}; it must be < {i - 1}")
        # The original adds the maps as they are, so the layers in between must keep the spatial size.
        if r >= 0 and any(ints["stride"][j] != 1 or 2 * ints["padding"][j] != ints["kernel_size"][j] - 1
                          for j in range(r + 1, i + 1)):
            raise ProbegenError(f"layer {i} takes a residual from layer {r} across a size-changing layer")
    return {"in_channels": int(arch["in_channels"]), **ints, "residual": residual,
            "activation": [str(a) for a in arch["activation"]], "num_classes": int(arch["num_classes"])}


def input_shape(arch):
    return (arch["in_channels"], IMAGE_SIZE, IMAGE_SIZE)


def output_dim(arch):
    return arch["num_classes"]


def layout(arch):
    """layers.0 .. layers.{L-1} with their own activations and residual sources, pooling, then fc. A residual
    ties the shared channels of its two layers (probegen/nets/layout.py works out the segments)."""
    arch = check_arch(arch)
    c = [arch["in_channels"], *arch["channels"]]
    layers = [Layer(f"layers.{i}", "conv", (c[i + 1], c[i], k, k), arch["activation"][i], arch["residual"][i])
              for i, k in enumerate(arch["kernel_size"])]
    return Layout(layers + [Layer("fc", "linear", (arch["num_classes"], c[-1]))])


def param_shapes(arch):
    return get_layout("wild_park", arch).param_shapes


def unflatten(arch, weights):
    """(B, D) -> [(W, b)] per conv layer then fc, as views into the rows; padding beyond is ignored."""
    return get_layout("wild_park", arch).split(weights)


def forward(arch, weights, x):
    """All B models of one arch at once: weights (B, D), x (K, C, H, W) shared or (B, K, C, H, W) per model
    -> logits (B, K, num_classes).

    The B models' filters are stacked along the channel axis, so the probes stay the conv batch axis:
    (K, B*c, H, W) with groups=B (each model sees only its own channels). With shared probes the first
    layer needs no groups at all: one ordinary conv with B*c1 output channels.
    """
    *convs, (fc_w, fc_b) = unflatten(arch, weights)
    B = weights.shape[0]
    x = x.to(weights.dtype)
    if x.dim() == 4:
        h, groups = x, 1  # (K, C, H, W)
    else:
        h, groups = x.transpose(0, 1).flatten(1, 2), B  # (K, B*C, H, W)
    K = h.shape[0]
    saved = {}  # layer index -> its post-activation output (K, B, c, H, W), kept only if a residual source
    for i, (w, b) in enumerate(convs):
        c_out = w.shape[1]
        h = F.conv2d(h, w.flatten(0, 1), b.flatten(), stride=arch["stride"][i], padding=arch["padding"][i],
                     groups=groups)  # (K, B*c_out, H, W)
        h = h.unflatten(1, (B, c_out))  # (K, B, c_out, H, W)
        r = arch["residual"][i]
        if r >= 0:
            res = saved[r][:, :, :c_out]  # the shared channels min(c_r, c_out)
            h = h + F.pad(res, (0, 0, 0, 0, 0, c_out - res.shape[2]))  # out of place: keeps autograd simple
        h = ACTIVATIONS[arch["activation"][i]](h)
        if i in arch["residual"]:
            saved[i] = h
        h, groups = h.flatten(1, 2), B
    pooled = h.mean(dim=(2, 3)).unflatten(1, (B, -1))  # (K, B, c_L)
    return torch.einsum("kbc,boc->bko", pooled, fc_w) + fc_b.unsqueeze(1)  # (B, K, num_classes)


class WildParkCNN(nn.Module):
    """One Wild Park CNN as a plain module, computing exactly what the original CNN.forward computes.

    Its state_dict keys are exactly the checkpoint's (layers.{i}.weight/bias, fc.weight/bias), so
    `load_state_dict(checkpoint["model"])` works.
    """

    def __init__(self, arch):
        super().__init__()
        self.arch = check_arch(arch)
        c = [self.arch["in_channels"], *self.arch["channels"]]
        self.layers = nn.ModuleList(
            nn.Conv2d(c[i], c[i + 1], kernel_size=k, stride=s, padding=p)
            for i, (k, s, p) in enumerate(zip(self.arch["kernel_size"], self.arch["stride"], self.arch["padding"])))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c[-1], self.arch["num_classes"])

    def forward(self, x):
        arch, residuals = self.arch, {}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            r = arch["residual"][i]
            if r > -1:
                ch = min(arch["channels"][r], arch["channels"][i])
                x = x.clone()
                x[:, :ch] += residuals[r][:, :ch]
            x = ACTIVATIONS[arch["activation"][i]](x)
            if i in arch["residual"]:
                residuals[i] = x
        return self.fc(self.flatten(self.global_pool(x)))


def reference_module(arch, row):
    """Rebuild one model from a packed row (numpy or tensor, possibly zero-padded on the right)."""
    return load_row(WildParkCNN(arch), row)


register("wild_park")(sys.modules[__name__])
