"""The Wild Park family: batched forward == per-model reference, and both == the original CNN's rules."""

import math

import numpy as np
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.nets import wild_park as wp


def make_arch(channels, kernels, residual, activation, stride=None):
    L = len(channels)
    stride = stride or [1] * L
    return wp.check_arch({"in_channels": 3, "channels": channels, "kernel_size": kernels, "stride": stride,
                          "padding": [k // 2 for k in kernels], "residual": residual,
                          "activation": activation, "num_classes": 10})


ARCHS = [
    # residuals into fewer channels (32 -> 8, 32 -> 16), twice from one source, chained
    make_arch([32, 16, 8, 16, 4], [3, 5, 7, 3, 5], [-1, -1, 0, 0, 2],
              ["relu", "gelu", "tanh", "sigmoid", "leaky_relu"]),
    # residuals into more channels (4 -> 16) and equal ones (8 -> 8)
    make_arch([4, 8, 16, 8], [7, 3, 5, 3], [-1, -1, 0, 1], ["none", "leaky_relu", "gelu", "relu"]),
    make_arch([8, 8, 8], [5, 5, 5], [-1, -1, 0], ["sigmoid", "tanh", "none"]),
    make_arch([16, 4], [3, 7], [-1, -1], ["gelu", "sigmoid"]),
    make_arch([8], [3], [-1], ["tanh"]),
    make_arch([4, 8], [3, 3], [-1, -1], ["relu", "relu"], stride=[2, 2]),  # stride is supported too
]


def num_params(arch):
    return sum(math.prod(shape) for _, shape in wp.param_shapes(arch))


def random_rows(arch, B, pad=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = num_params(arch)
    rows = torch.zeros(B, n + pad)  # zero-padded like a heterogeneous packed zoo
    rows[:, :n] = 0.3 * torch.randn(B, n, generator=g)
    return rows


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a["channels"])))
def test_batched_forward_matches_reference_per_model(arch):
    rows = random_rows(arch, B=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (K, 3, 32, 32)
    xb = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # (B, K, 3, 32, 32)
    with torch.no_grad():
        y, yb = wp.forward(arch, rows, x), wp.forward(arch, rows, xb)
        assert y.shape == yb.shape == (3, 4, 10)
        for b in range(3):
            module = wp.reference_module(arch, rows[b].numpy())
            torch.testing.assert_close(y[b], module(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(yb[b], module(xb[b]), atol=1e-5, rtol=0)


def test_every_activation_is_covered():
    assert {a for arch in ARCHS for a in arch["activation"]} == set(wp.ACTIVATIONS)


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_state_dict_keys_and_shapes_are_the_packed_order(arch):
    sd = wp.WildParkCNN(arch).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == wp.param_shapes(arch)
    rows = random_rows(arch, B=1)
    module = wp.reference_module(arch, rows[0])
    flat = torch.cat([v.reshape(-1) for v in module.state_dict().values()])
    assert torch.equal(flat, rows[0, :num_params(arch)])


def logits_from_biases(arch, biases, fc_w, fc_b):
    """A packed row whose conv weights are all zero: layer i's pre-activation is its bias (+ residual)."""
    parts = []
    for (name, shape) in wp.param_shapes(arch):
        if name.startswith("layers.") and name.endswith("weight"):
            parts.append(torch.zeros(math.prod(shape)))
        elif name.startswith("layers."):
            parts.append(torch.tensor(biases[int(name.split(".")[1])], dtype=torch.float32))
    return torch.cat(parts + [torch.tensor(fc_w, dtype=torch.float32).reshape(-1),
                              torch.tensor(fc_b, dtype=torch.float32)])[None]  # (1, D)


@pytest.mark.parametrize("channels", [[5, 2, 3], [2, 2, 4], [3, 1, 3]])
def test_residual_is_added_before_the_activation_on_the_shared_channels(channels):
    # The original: x = conv(x); x[:, :ch] += residuals[r][:, :ch] with ch = min(c_r, c_i); x = act(x),
    # where residuals[r] is layer r's output after its activation.
    arch = make_arch(channels, [3, 3, 3], [-1, -1, 0], ["tanh", "none", "sigmoid"])
    rng = np.random.default_rng(0)
    biases = [rng.normal(size=c) for c in channels]
    fc_w, fc_b = rng.normal(size=(10, channels[-1])), rng.normal(size=10)
    h0 = np.tanh(biases[0])
    pre2 = biases[2].copy()
    ch = min(channels[0], channels[2])
    pre2[:ch] += h0[:ch]
    expected = fc_w @ (1 / (1 + np.exp(-pre2))) + fc_b  # (10,)
    row = logits_from_biases(arch, biases, fc_w, fc_b)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for y in (wp.forward(arch, row, x)[0], wp.reference_module(arch, row[0])(x)):
            np.testing.assert_allclose(y.numpy(), np.tile(expected, (2, 1)), atol=1e-5)


def test_activations_are_the_originals():
    # F.leaky_relu's default slope 0.01; exact (erf) GELU; "none" is the identity.
    v = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    erf = np.vectorize(math.erf)
    expected = {"relu": np.maximum(v, 0), "leaky_relu": np.where(v > 0, v, 0.01 * v),
                "gelu": 0.5 * v * (1 + erf(v / math.sqrt(2))), "tanh": np.tanh(v),
                "sigmoid": 1 / (1 + np.exp(-v)), "none": v}
    for name, want in expected.items():
        arch = make_arch([5], [3], [-1], [name])
        row = logits_from_biases(arch, [v], np.eye(10, 5), np.zeros(10))
        y = wp.forward(arch, row, torch.zeros(1, 3, 32, 32))[0, 0, :5]
        np.testing.assert_allclose(y.numpy(), want, atol=1e-6, err_msg=name)


def test_input_normalization_uses_cifar10_statistics():
    img = torch.ones(3, 32, 32) * torch.tensor(wp.CIFAR10_MEAN).view(3, 1, 1)
    assert wp.normalize(img).abs().max() < 1e-7
    assert torch.allclose(wp.normalize(torch.ones(3, 2, 2))[:, 0, 0],
                          (1 - torch.tensor(wp.CIFAR10_MEAN)) / torch.tensor(wp.CIFAR10_STD))


def test_gradients_flow_to_shared_probes():
    arch = ARCHS[0]
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    wp.forward(arch, random_rows(arch, B=2), x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    ({"activation": ["relu", "swish", "relu"]}, "unknown activation 'swish'"),
    ({"residual": [-1, 0, -1]}, "residual from layer 0"),
    ({"kernel_size": [3, 3]}, "kernel_size has 2 entries"),
    ({"stride": [1, 2, 1], "residual": [-1, -1, 0]}, "size-changing"),
])
def test_invalid_archs_are_rejected(change, message):
    arch = {"in_channels": 3, "channels": [4, 4, 4], "kernel_size": [3, 3, 3], "stride": [1, 1, 1],
            "padding": [1, 1, 1], "residual": [-1, -1, -1], "activation": ["relu"] * 3, "num_classes": 10}
    with pytest.raises(ProbegenError, match=message):
        wp.check_arch({**arch, **change})


def test_config_round_trip():
    arch = ARCHS[1]
    cfg = wp.to_config(arch)
    assert cfg["channels"][0] == 3 and cfg["n_layers"] == 4
    assert wp.arch_from_config(cfg) == arch
    with pytest.raises(ProbegenError, match="n_layers=3"):
        wp.arch_from_config({**cfg, "n_layers": 3})
