"""DWSNets layers (probegen/nn/dws.py) and the set views they act on (probegen/nn/weight_space.py)."""

import pytest
import torch

from nn.equivariance import one_thread  # noqa: F401  (a fixture)
from nn.equivariance import check_affine_layer, mlp_layout, natural, permute_natural, permute_views, random_perms
from probegen.nn.dws import SAB, Block, DeepSetLayer, DWSLayer, DWSNet, SetBySetLayer
from probegen.nn.weight_space import SymmetricStats, WeightSpace

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"reduction": "max", "set_layer": "sab", "fc_layers": 1, "init_scale": 1.0}


def views_of(space, layout, B=3, F=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = natural(layout, torch.randn(B, layout.num_params, generator=gen))
    return [space.to_sets(t.unsqueeze(-1).expand(*t.shape, F) * torch.randn(F, generator=gen), k)
            for k, t in enumerate(tensors)]


def test_set_views_follow_the_layout_permutation_and_round_trip():
    layout = mlp_layout([2, 4, 3, 1])
    space = WeightSpace(layout)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, layout.num_params, generator=gen)
    perms = random_perms(space, gen)  # groups 1 and 2: the hidden layers
    # the project's own permutation of packed rows (per row; here the same for both rows)
    moved = layout.permute(rows, [perms[1].expand(2, -1), perms[2].expand(2, -1)])
    for k, (a, b) in enumerate(zip(natural(layout, moved), permute_natural(space, natural(layout, rows), perms))):
        assert torch.equal(a, b)
        view = space.to_sets(natural(layout, rows)[k].unsqueeze(-1), k)
        back = space.from_sets(view, k, natural(layout, rows)[k].shape[1:])
        assert torch.equal(back.squeeze(-1), natural(layout, rows)[k])
    views = [space.to_sets(t.unsqueeze(-1), k) for k, t in enumerate(natural(layout, rows))]
    moved_views = [space.to_sets(t.unsqueeze(-1), k) for k, t in enumerate(natural(layout, moved))]
    for a, b in zip(permute_views(space, views, perms), moved_views):
        assert torch.equal(a, b)
    # set views: hidden axes first, fixed neurons folded into features (W_0: inputs; W_2: the output)
    assert [tuple(v.shape) for v in views] == [(2, 4, 2), (2, 4, 1), (2, 3, 4, 1), (2, 3, 1), (2, 3, 1), (2, 1)]


def test_symmetric_stats_are_per_fixed_entry_over_models_and_hidden_axes():
    layout = mlp_layout([2, 4, 3, 1])
    space = WeightSpace(layout)
    rows = torch.randn(50, layout.num_params) * torch.linspace(0.1, 3, layout.num_params) + 1
    stats = SymmetricStats(space)
    stats.add(space, natural(layout, rows[:20]))
    stats.add(space, natural(layout, rows[20:]))  # chunks add up
    (m0, s0), _, (m1, s1), *_ = stats.result()
    W0, _, W1 = natural(layout, rows)[:3]
    torch.testing.assert_close(m0, W0.mean((0, 1)).float())  # one per input coordinate
    torch.testing.assert_close(s0, W0.permute(2, 0, 1).reshape(2, -1).std(1, unbiased=False).float())
    torch.testing.assert_close(m1, W1.mean().reshape(1).float())  # a middle weight: one scalar
    torch.testing.assert_close(s1, W1.std(unbiased=False).reshape(1).float())


def test_blocks_are_dwsnets_case_analysis():
    """The op of every X -> Y block of a 4-layer MLP, against DWSNets' enumerated cases
    (nn/layers/{weight,bias}_to_{weight,bias}.py): set layer, set x set layer, or pool + MLP."""
    L = 4
    space = WeightSpace(mlp_layout([2, 3, 3, 3, 1]))
    layer = DWSLayer(space, 1, 8, {**CFG, "set_layer": "ds"}, heads=8)
    kind = {(b.x, b.y): type(b.op) for b in layer.blocks}

    def expected(x, y):
        (i, xw), (j, yw) = divmod(x, 2), divmod(y, 2)
        xw, yw, last = xw == 0, yw == 0, L - 1
        if xw and yw:  # weight -> weight
            if i == j:
                return SetBySetLayer if 0 < i < last else DeepSetLayer
            return DeepSetLayer if abs(i - j) == 1 else torch.nn.Sequential
        if xw:  # W_i -> b_j
            return DeepSetLayer if (i == j and j != last) or i == j + 1 else torch.nn.Sequential
        if yw:  # b_i -> W_j
            return DeepSetLayer if (i == j and j != last) or i == j - 1 else torch.nn.Sequential
        return DeepSetLayer if i == j != last else torch.nn.Sequential  # b_i -> b_j

    assert len(kind) == (2 * L) ** 2
    for (x, y), op in kind.items():
        assert op is expected(x, y), (space.tensors[x].name, space.tensors[y].name)


@pytest.mark.parametrize("dims, reduction", [([1, 2, 2, 2, 1], "mean"), ([2, 3, 2], "sum"), ([3, 2], "mean")])
def test_linear_dws_layer_is_every_equivariant_affine_map(dims, reduction):
    """DeepSets set layers and mean/sum pooling make the layer affine: it must be constant on the orbits of
    the hidden-permutation group (equivariant) and span all of them (all blocks present). Depth 4, 2 and a
    single layer (no hidden neurons: every affine map)."""
    layout = mlp_layout(dims)
    space = WeightSpace(layout)

    cfg = {**CFG, "set_layer": "ds", "reduction": reduction}
    dims_expected, rank = check_affine_layer(lambda: DWSLayer(space, 1, 1, cfg, heads=1), space, layout)
    assert rank == dims_expected


@pytest.mark.parametrize("set_layer", ["sab", "ds"])
def test_dws_layer_is_equivariant_to_every_hidden_permutation(set_layer):
    layout = mlp_layout([2, 5, 4, 3, 1])
    space = WeightSpace(layout)
    views = views_of(space, layout, F=8)
    layer = DWSLayer(space, 8, 16, {**CFG, "set_layer": set_layer}, heads=8)
    for seed in range(3):
        perms = random_perms(space, torch.Generator().manual_seed(seed))
        moved_then_layer = layer(permute_views(space, views, perms), space)
        for a, b in zip(moved_then_layer, permute_views(space, layer(views, space), perms)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dwsnet_is_invariant_and_width_agnostic():
    torch.manual_seed(0)
    layout = mlp_layout([2, 6, 6, 1])
    space = WeightSpace(layout)
    net = DWSNet(space, out_dim=10, hidden=16, layers=3).eval()
    views = views_of(space, layout, B=4, F=1)
    out = net(views, space)
    assert out.shape == (4, 10)
    perms = random_perms(space, torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(permute_views(space, views, perms), space), out, rtol=1e-5, atol=1e-5)
    # the same parameters read a network of other hidden widths (same depth, inputs and outputs)
    narrow = WeightSpace(mlp_layout([2, 3, 5, 1]))
    assert narrow.signature() == space.signature()
    assert net(views_of(narrow, mlp_layout([2, 3, 5, 1]), B=2, F=1), narrow).shape == (2, 10)


def test_sab_is_permutation_equivariant_and_deepsets_subtracts_the_pooled_term():
    x = torch.randn(2, 7, 6)
    perm = torch.randperm(7)
    sab = SAB(6, 8, heads=4)
    torch.testing.assert_close(sab(x[:, perm]), sab(x)[:, perm])
    ds = DeepSetLayer(6, 8, "max", fc_layers=1)
    expected = ds.gamma(x) - ds.lam(x.amax(1, keepdim=True))
    torch.testing.assert_close(ds(x), expected)


def test_block_pools_the_unshared_axis_with_the_reduction():
    """W_1 -> b_0 shares g_1 (W_1's input axis): W_1 is max-pooled over its output axis g_2 first."""
    layout = mlp_layout([2, 3, 4, 1])
    space = WeightSpace(layout)
    views = views_of(space, layout, F=2)
    block = Block(space, 2, 1, 2, 3, {**CFG, "set_layer": "ds"}, heads=1)  # x = W_1, y = b_0
    assert block.shared == (1,)
    torch.testing.assert_close(block(views[2], space), block.op(views[2].amax(1)))
