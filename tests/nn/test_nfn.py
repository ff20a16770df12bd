"""NFN layers (probegen/nn/nfn.py): NP and HNP linear layers, encodings, the invariant network."""

import math

import pytest
import torch

from nn.equivariance import one_thread  # noqa: F401  (a fixture)
from nn.equivariance import (check_affine_layer, cnn_layout, mlp_layout, natural, permute_natural, permute_views,
                             random_perms)
from probegen.nn.nfn import NFN, GaussianFourier, IOEncoding, NFLinear, fourier_code
from probegen.nn.weight_space import WeightSpace

pytestmark = pytest.mark.usefixtures("one_thread")

# depth 4 (distant layers), 2, 1 (no hidden neurons); a CNN with a 2 x 2 kernel, a 1 x 1 kernel and a linear layer
LAYOUTS = {"mlp4": mlp_layout([2, 3, 2, 3, 1]), "mlp2": mlp_layout([2, 3, 2]), "mlp1": mlp_layout([3, 2]),
           "cnn": cnn_layout([1, 2, 2], [2, 1], 2)}


@pytest.mark.parametrize("permute_io", [False, True], ids=["HNP", "NP"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_nf_linear_is_every_equivariant_affine_map(name, permute_io):
    """Constant on the orbits of the symmetry group (equivariant) and spanning all of them (complete):
    hidden permutations (HNP) or every neuron group permuted (NP); a CNN's kernel entries stay features."""
    layout = LAYOUTS[name]
    space = WeightSpace(layout, permute_io=permute_io)
    dims, rank = check_affine_layer(lambda: NFLinear(space, 1, 1), space, layout)
    assert rank == dims


def test_np_layer_has_nfn_nplinear_terms():
    """Parameter count of NFN's NPLinear for the same network (nfn/layers/layers.py): per layer i with
    filter factor f_i, a pointwise map, a row and a column broadcast, and the global term, for W_i and b_i."""
    layout = cnn_layout([2, 3, 4], [3, 1], 5)
    facs, L, c_in, c_out = [9, 1, 1], 3, 4, 6
    n_rc = L + sum(facs)
    expected = 0
    for i, f in enumerate(facs):
        row_in = f + ((facs[i - 1] + 1) if i > 0 else 0)
        col_in = (f + 1) + (facs[i + 1] if i < L - 1 else 0)
        expected += (f * c_in + 1) * f * c_out + (n_rc * c_in + 1) * f * c_out  # layer_i, layer_i_rc
        expected += (row_in * c_in + 1) * f * c_out + (col_in * c_in + 1) * f * c_out  # layer_i_r, layer_i_c
        expected += (col_in * c_in + 1) * c_out + (n_rc * c_in + 1) * c_out  # bias_i, bias_i_rc
    layer = NFLinear(WeightSpace(layout, permute_io=True), c_in, c_out)
    assert sum(p.numel() for p in layer.parameters()) == expected


@pytest.mark.parametrize("permute_io", [False, True], ids=["HNP", "NP"])
def test_nf_linear_is_equivariant_with_many_channels(permute_io):
    layout = cnn_layout([3, 5, 4], [3, 3], 10)
    space = WeightSpace(layout, permute_io=permute_io)
    gen = torch.Generator().manual_seed(0)
    tensors = [t.unsqueeze(-1).expand(*t.shape, 3) * torch.randn(3, generator=gen)
               for t in natural(layout, torch.randn(2, layout.num_params, generator=gen))]
    views = [space.to_sets(t, k) for k, t in enumerate(tensors)]
    layer = NFLinear(space, 3, 7)
    perms = random_perms(space, gen)
    for a, b in zip(layer(permute_views(space, views, perms), space), permute_views(space, layer(views, space), perms)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_io_encoding_codes_layers_inputs_and_outputs():
    layout = mlp_layout([3, 4, 4, 2])
    space = WeightSpace(layout, permute_io=True)
    tensors = [t.unsqueeze(-1) for t in natural(layout, torch.randn(1, layout.num_params))]
    enc = IOEncoding(max_freq=10, bands=2)
    out = enc(tensors, space)
    assert [t.shape[-1] for t in out] == [1 + 5] * 6

    def code(x):  # NFN's fourier_encode: scales linspace(1, max_freq / 2, bands) = 1, 5
        return torch.tensor([math.sin(math.pi * x), math.sin(5 * math.pi * x),
                             math.cos(math.pi * x), math.cos(5 * math.pi * x), x])

    layer_x, in_x, out_x = [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-1.0, 1.0]
    W0, b0, W1, _, W2, b2 = out
    torch.testing.assert_close(W0[0, 3, 2, 1:], code(layer_x[0]) + code(in_x[2]))  # (out 3, in 2)
    torch.testing.assert_close(b0[0, 1, 1:], code(layer_x[0]))
    torch.testing.assert_close(W1[0, 2, 3, 1:], code(layer_x[1]))
    torch.testing.assert_close(W2[0, 1, 0, 1:], code(layer_x[2]) + code(out_x[1]))
    torch.testing.assert_close(b2[0, 0, 1:], code(layer_x[2]) + code(out_x[0]))
    torch.testing.assert_close(W0[..., 0], tensors[0][..., 0])  # the features themselves are kept
    assert fourier_code(torch.tensor([0.5]), 10, 2).shape == (1, 5)


def test_gaussian_fourier_features():
    torch.manual_seed(0)
    ff = GaussianFourier(1, 4, scale=10.0)
    x = torch.randn(2, 3, 1)
    expected = torch.cat([torch.sin(2 * math.pi * x * ff.B[0]), torch.cos(2 * math.pi * x * ff.B[0])], -1)
    torch.testing.assert_close(ff(x), expected)
    assert ff.B.std() > 3  # N(0, scale^2)


def _nfn_outputs(net, space, layout, rows, perms=None):
    tensors = natural(layout, rows)
    if perms:
        tensors = permute_natural(space, tensors, perms)
    return net([t.unsqueeze(-1) for t in tensors], space)


@pytest.mark.parametrize("io_encoding", [True, False])
def test_np_network_is_hidden_invariant_and_io_encoding_breaks_io_symmetry(io_encoding):
    torch.manual_seed(0)
    layout = mlp_layout([2, 6, 5, 3])
    space = WeightSpace(layout, permute_io=True)
    net = NFN(space, 4, channels=[8, 8], fourier_size=4, io_bands=3 if io_encoding else 0, head_hidden=16).eval()
    rows = torch.randn(3, layout.num_params)
    out = _nfn_outputs(net, space, layout, rows)
    hidden = {g: torch.randperm(space.sizes[g]) for g in (1, 2)}
    torch.testing.assert_close(_nfn_outputs(net, space, layout, rows, hidden), out, rtol=1e-5, atol=1e-5)
    io = {0: torch.tensor([1, 0]), 3: torch.tensor([2, 0, 1])}
    moved = _nfn_outputs(net, space, layout, rows, io)
    if io_encoding:  # inputs and outputs are told apart
        assert (moved - out).abs().max() > 1e-4
    else:  # NP layers alone are invariant to every neuron permutation
        torch.testing.assert_close(moved, out, rtol=1e-5, atol=1e-5)


def test_hnp_network_on_a_cnn_is_hidden_invariant():
    torch.manual_seed(0)
    layout = cnn_layout([1, 4, 4, 4], [3, 3, 3], 10)
    space = WeightSpace(layout)
    net = NFN(space, 1, channels=[6, 6, 5], head_hidden=12).eval()
    rows = torch.randn(4, layout.num_params)
    perms = random_perms(space, torch.Generator().manual_seed(3))
    assert sorted(perms) == [1, 2, 3]
    torch.testing.assert_close(_nfn_outputs(net, space, layout, rows, perms), _nfn_outputs(net, space, layout, rows),
                               rtol=1e-5, atol=1e-5)
