import pytest
import torch
from torch import nn

from probegen.errors import ProbegenError
from probegen.probes.generators import ConvGenerator, FixedProbes, FreeProbes, MLPGenerator, generator_for


def _conv_specs(gen):
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
            for m in gen.net if isinstance(m, nn.ConvTranspose2d)]


def test_conv_generator_layers_are_the_reference_ones():
    # REFERENCE §1, CIFAR10-GS (6 layers, 1 channel) and Wild Park (5 layers, 3 channels)
    assert _conv_specs(ConvGenerator(1, layers=6)) == [
        (32, 128, 4, 1, 0), (128, 64, 4, 2, 1), (64, 32, 4, 2, 1), (32, 32, 3, 1, 1), (32, 16, 4, 2, 1), (16, 1, 3, 1, 1)]
    assert _conv_specs(ConvGenerator(3, layers=5)) == [
        (32, 128, 4, 1, 0), (128, 64, 4, 2, 1), (64, 32, 4, 2, 1), (32, 16, 4, 2, 1), (16, 3, 3, 1, 1)]
    for gen in (ConvGenerator(1, layers=6), ConvGenerator(3, layers=5)):
        assert all(isinstance(m, nn.ConvTranspose2d) and m.bias is not None for m in gen.net)  # no activations
    with pytest.raises(ProbegenError):
        ConvGenerator(1, layers=4)


def test_mlp_generator_layers():
    gen = MLPGenerator(2)
    assert [(m.in_features, m.out_features) for m in gen.net] == [(32, 32), (32, 2)]
    assert all(isinstance(m, nn.Linear) for m in gen.net)


@pytest.mark.parametrize("channels,layers", [(1, 6), (3, 5)])
def test_conv_generator_output_shape_and_range(channels, layers):
    z = torch.randn(5, 32) * 10
    out = ConvGenerator(channels, layers=layers)(z)
    assert out.shape == (5, channels, 32, 32)
    assert out.abs().max() <= 1
    gen = ConvGenerator(channels, layers=layers)
    assert torch.allclose(gen(z), torch.tanh(gen.affine(z)))


@pytest.mark.parametrize("make", [lambda: MLPGenerator(2), lambda: ConvGenerator(1, 6), lambda: ConvGenerator(3, 5)])
def test_generator_is_affine_in_z(make):
    torch.manual_seed(0)
    gen = make().double()
    z1, z2, zero = torch.randn(4, 32).double(), torch.randn(4, 32).double(), torch.zeros(4, 32).double()
    a, b = 1.7, -0.6
    g0 = gen.affine(zero)
    lhs = gen.affine(a * z1 + b * z2) - g0
    rhs = a * (gen.affine(z1) - g0) + b * (gen.affine(z2) - g0)
    assert torch.allclose(lhs, rhs, atol=1e-9)
    # ... and genuinely depends on z (not constant)
    assert not torch.allclose(gen.affine(z1), g0)


def test_tanh_output_is_not_affine():
    torch.manual_seed(0)
    gen = ConvGenerator(1, 6).double()
    z = torch.randn(4, 32).double() * 50  # large enough to saturate
    assert not torch.allclose(gen(2 * z) - gen(0 * z), 2 * (gen(z) - gen(0 * z)), atol=1e-3)


def test_generator_for_picks_by_probe_shape():
    assert isinstance(generator_for((2,)), MLPGenerator)
    assert len(_conv_specs(generator_for((1, 32, 32)))) == 6
    assert len(_conv_specs(generator_for((3, 32, 32)))) == 5
    assert len(_conv_specs(generator_for((3, 32, 32), layers=6))) == 6
    with pytest.raises(ProbegenError):
        generator_for((1, 28, 28))


def test_free_and_fixed_probes():
    torch.manual_seed(0)
    free = FreeProbes(7, (1, 32, 32), bounded=True)
    assert free().shape == (7, 1, 32, 32) and free().abs().max() < 1
    assert torch.allclose(free(), torch.tanh(free.raw))
    coords = FreeProbes(7, (2,), bounded=False)
    assert torch.equal(coords(), coords.raw) and coords.raw.requires_grad
    fixed = FixedProbes(torch.ones(3, 2))
    assert list(fixed.parameters()) == [] and "fixed" in fixed.state_dict()
    assert torch.equal(fixed(), torch.ones(3, 2))


@pytest.mark.parametrize("channels,layers", [(1, 6), (3, 5)])
def test_conv_generator_through_its_basis_is_the_layer_by_layer_map(channels, layers):
    """K = 128 probes go through the map formed on the 32 basis vectors; it must be the stack's own output
    and give the stack's own gradients (float64, so only the map, not rounding, is compared)."""
    torch.manual_seed(1)
    gen = ConvGenerator(channels, layers=layers).double()
    z = torch.randn(128, 32, dtype=torch.float64, requires_grad=True)
    direct = gen.net(z.view(128, 32, 1, 1))
    (g_direct,) = torch.autograd.grad(direct.sin().sum(), [z])
    w_direct = torch.autograd.grad(gen.net(z.view(128, 32, 1, 1)).sin().sum(), list(gen.parameters()))
    through = gen.affine(z)
    assert through.shape == direct.shape == (128, channels, 32, 32)
    torch.testing.assert_close(through, direct, rtol=1e-10, atol=1e-12)
    (g_through,) = torch.autograd.grad(through.sin().sum(), [z])
    w_through = torch.autograd.grad(gen.affine(z).sin().sum(), list(gen.parameters()))
    torch.testing.assert_close(g_through, g_direct, rtol=1e-10, atol=1e-12)
    for a, b in zip(w_through, w_direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    few = z[:20]  # no more probes than latent dimensions + 1: the stack itself
    assert torch.equal(gen.affine(few), gen.net(few.reshape(20, 32, 1, 1)))
