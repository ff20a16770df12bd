"""The declared weight structure: shapes, per-layer views, and the symmetry (residual ties) worked out by hand."""

import pytest
import torch

from probegen.errors import ProbegenError
from probegen.nets import get_layout, num_params, per_layer
from probegen.nets.layout import Layer, Layout
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch


def conv(name, c_out, c_in, residual=-1, k=3):
    return Layer(name, "conv", (c_out, c_in, k, k), "relu", residual)


def segments(layout):
    return [[(s.start, s.end, s.tie) for s in segs] for segs in layout.segments]


def test_published_architectures_have_their_parameter_counts_and_state_dict_order():
    assert num_params("siren", DWSNETS_ARCH) == 1185
    assert num_params("small_cnn", zoo_arch("relu")) == 4970
    lay = get_layout("siren", DWSNETS_ARCH)
    assert [n for n, _ in lay.param_shapes] == [f"seq.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert [l.activation for l in lay.layers] == ["sin", "sin", "none"]
    assert segments(lay) == [[(0, 32, 0)], [(0, 32, 1)]]  # two free hidden layers


def test_split_gives_views_in_packed_order_and_flatten_inverts_it():
    lay = get_layout("small_cnn", zoo_arch("tanh"))
    rows = torch.randn(3, lay.num_params + 5)  # zero padding beyond the model is ignored
    layers = lay.split(rows)
    assert [tuple(W.shape[1:]) for W, _ in layers] == [(16, 1, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (10, 16)]
    assert torch.equal(layers[0][1], rows[:, 144:160])  # conv0 bias after its 144 kernel entries
    assert torch.equal(lay.flatten(layers), rows[:, :lay.num_params])
    with pytest.raises(ProbegenError, match="columns"):
        lay.split(rows[:, :100])


def test_a_residual_ties_the_shared_channels_and_cuts_propagate_across_links():
    # 0: 8 ch, 1: 4 ch, 2: 6 ch <- residual from 0 (ties [0, 6) of 0 and 2), 3: 5 ch <- residual from 1 (ties
    # [0, 4) of 1 and 3). Layer 0 is cut at 6; nothing else cuts it.
    lay = Layout([conv("layers.0", 8, 3), conv("layers.1", 4, 8), conv("layers.2", 6, 4, residual=0),
                  conv("layers.3", 5, 6, residual=1), Layer("fc", "linear", (10, 5))])
    assert segments(lay) == [[(0, 6, 0), (6, 8, 1)], [(0, 4, 2)], [(0, 6, 0)], [(0, 4, 2), (4, 5, 3)]]
    # Two links from one layer with different widths: layer 0 ties [0, 2) with layer 2 and [0, 4) with layer 3,
    # so [0, 2) is shared by all three and [2, 4) by layers 0 and 3 only.
    lay = Layout([conv("layers.0", 4, 3), conv("layers.1", 4, 4), conv("layers.2", 2, 4, residual=0),
                  conv("layers.3", 8, 2, residual=0), Layer("fc", "linear", (10, 8))])
    assert segments(lay) == [[(0, 2, 0), (2, 4, 1)], [(0, 4, 2)], [(0, 2, 0)], [(0, 2, 0), (2, 4, 1), (4, 8, 3)]]


def test_random_permutations_respect_the_ties_and_wrong_ones_are_refused():
    lay = Layout([conv("layers.0", 8, 3), conv("layers.1", 4, 8), conv("layers.2", 6, 4, residual=0),
                  Layer("fc", "linear", (10, 6))])
    perms = lay.random_permutation(50, torch.Generator().manual_seed(0))
    assert torch.equal(perms[0][:, :6], perms[2])  # tied channels move together
    assert (perms[0][:, 6:] >= 6).all()  # the untied rest stays in its segment
    assert not torch.equal(perms[1], torch.arange(4).expand(50, 4))
    lay.check_perms(perms)
    swapped = [p.clone() for p in perms]
    swapped[2] = swapped[2].flip(1)
    with pytest.raises(ProbegenError, match="tied channels of layers.2"):
        lay.check_perms(swapped)
    across = [p.clone() for p in perms]
    across[0] = across[0].flip(1)
    with pytest.raises(ProbegenError, match="residual segment"):
        lay.check_perms(across)


def test_bad_declarations_are_refused():
    with pytest.raises(ProbegenError, match="reads 5 units"):
        Layout([Layer("a", "linear", (4, 2)), Layer("b", "linear", (1, 5))])
    with pytest.raises(ProbegenError, match="before layer 0"):
        Layout([conv("a", 4, 3), conv("b", 4, 4, residual=0), Layer("fc", "linear", (10, 4))])
    with pytest.raises(ProbegenError, match="kind"):
        Layout([Layer("a", "conv", (4, 2))])


def test_per_layer_groups_a_mixed_batch_by_architecture():
    archs = [zoo_arch("relu"), {**DWSNETS_ARCH, "hidden": [4, 4]}]
    ids = torch.tensor([1, 0, 1])
    rows = torch.randn(3, 4970)
    groups = per_layer("small_cnn", [archs[0]], rows[:1], torch.zeros(1, dtype=torch.long))
    assert len(groups) == 1 and groups[0][0] == 0 and len(groups[0][3]) == 4
    groups = per_layer("siren", [DWSNETS_ARCH, archs[1]], rows, ids)
    assert [(a, r.tolist()) for a, r, _, _ in groups] == [(0, [1]), (1, [0, 2])]
    (W0, b0), _, _ = groups[1][3]
    assert W0.shape == (2, 4, 2) and torch.equal(W0[1].flatten(), rows[2, :8])
