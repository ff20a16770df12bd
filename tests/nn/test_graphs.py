"""Graph construction (probegen/nn/graphs.py) against graphs built by hand: a literal tiny CNN with a
residual, and a naive per-model loop over units on every family; mixed-architecture batches; the graph of
a permuted model; standardisation statistics; degree histogram; the dense form."""

import numpy as np
import pytest
import torch

from fake_zoo import make_zoo, register_tiny
from probegen.nets import get_layout
from probegen.nn.graphs import ACTIVATIONS, NO_ACTIVATION, GraphBuilder, to_dense

SIREN = {"in_dim": 2, "hidden": [3, 2], "out_dim": 1, "w0": 30.0, "out_bias": 0.5}
SMALL_CNN = {"in_channels": 1, "channels": [2, 3], "kernel": 3, "stride": 2, "padding": 0, "num_classes": 2,
             "activation": "tanh"}


def wild_park(channels, kernels, residual, acts, in_channels=1, num_classes=2):
    return {"in_channels": in_channels, "channels": channels, "kernel_size": kernels, "stride": [1] * len(channels),
            "padding": [k // 2 for k in kernels], "residual": residual, "activation": acts,
            "num_classes": num_classes}


TINY_WP = wild_park([2, 1, 2], [3, 1, 3], [-1, -1, 0], ["relu", "tanh", "gelu"])
WP_ARCHS = [wild_park([3, 2, 4, 3], [3, 5, 1, 3], [-1, -1, 0, 1], ["gelu", "none", "sigmoid", "leaky_relu"]),
            TINY_WP, wild_park([4, 4], [5, 3], [-1, -1], ["relu", "relu"])]
CASES = {  # family -> archs of a zoo
    "tiny_mlp": [{"in": 2, "hidden": 3, "out": 2}, {"in": 2, "hidden": 4, "out": 2}],
    "siren": [SIREN],
    "small_cnn": [SMALL_CNN, {**SMALL_CNN, "activation": "relu"}],
    "wild_park": WP_ARCHS,
}


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def batch(zoo):
    return zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())


def graph_of(g, b):
    """Model b's graph out of a GraphBatch: {local node: (bias, position, activation)}, {(src, dst): feature},
    output nodes (local)."""
    ids = torch.nonzero(g.node_graph == b).squeeze(1)
    nodes = {int(g.node_local[n]): (float(g.node_x[n, 0]), int(g.node_pos[n]), int(g.node_act[n])) for n in ids}
    mine = torch.nonzero(g.node_graph[g.edge_index[0]] == b).squeeze(1)
    assert (g.node_graph[g.edge_index[1, mine]] == b).all()  # no edge leaves its graph
    edges = {(int(g.node_local[g.edge_index[0, e]]), int(g.node_local[g.edge_index[1, e]])): g.edge_x[e].tolist()
             for e in mine}
    assert len(edges) == len(mine)  # no duplicate edges
    assert sorted(nodes) == list(range(len(nodes)))
    return nodes, edges, g.node_local[g.output_nodes[b]].tolist()


def naive_graph(layout, params, kernel, reverse, max_inputs, max_hidden):
    """One model's graph with plain loops over layers and units (params: [(W, b)] of one model, numpy)."""
    KH, KW = kernel
    centre = (KH // 2) * KW + KW // 2
    n_in = layout.layers[0].units_in
    offsets, nodes = [0, n_in], {i: (0.0, i, NO_ACTIVATION) for i in range(n_in)}
    for l, (layer, (W, b)) in enumerate(zip(layout.layers, params)):
        last = l == len(layout) - 1
        for o in range(layer.units_out):
            pos = max_inputs + max_hidden + o if last else max_inputs + l
            act = NO_ACTIVATION if last else ACTIVATIONS.index(layer.activation)
            nodes[offsets[-1] + o] = (float(b[o]), pos, act)
        offsets.append(offsets[-1] + layer.units_out)
    edges = {}
    for l, (layer, (W, _)) in enumerate(zip(layout.layers, params)):
        for o in range(layer.units_out):
            for i in range(layer.units_in):
                f = [0.0] * (KH * KW)
                if W.ndim == 2:
                    f[centre] = float(W[o, i])
                else:
                    kh, kw = W.shape[2:]
                    for y in range(kh):
                        for x in range(kw):
                            f[(y + (KH - kh) // 2) * KW + x + (KW - kw) // 2] = float(W[o, i, y, x])
                edges[(offsets[l] + i, offsets[l + 1] + o)] = f
        if layer.residual >= 0:
            for c in range(min(layout.layers[layer.residual].units_out, layer.units_out)):
                f = [0.0] * (KH * KW)
                f[centre] = 1.0
                edges[(offsets[layer.residual + 1] + c, offsets[l + 1] + c)] = f
    if reverse:
        zero = [0.0] * (KH * KW)
        both = {}
        for (s, d), f in edges.items():
            both[(s, d)], both[(d, s)] = f + zero + f, zero + f + f
        edges = both
    return nodes, edges, list(range(offsets[-2], offsets[-1]))


def assert_same_graph(got, expected):
    (gn, ge, go), (en, ee, eo) = got, expected
    assert gn.keys() == en.keys() and go == eo
    for k in en:
        assert gn[k][1:] == en[k][1:], f"node {k}"
        assert gn[k][0] == pytest.approx(en[k][0], abs=1e-6), f"node {k}"
    assert ge.keys() == ee.keys()
    for k in ee:
        np.testing.assert_allclose(ge[k], ee[k], atol=1e-6, err_msg=f"edge {k}")


def test_tiny_cnn_with_a_residual_written_out_by_hand():
    zoo = make_zoo("wild_park", [TINY_WP], 1, task="regression")
    builder = GraphBuilder("wild_park", [TINY_WP])
    (W0, b0), (W1, b1), (W2, b2), (Wf, bf) = get_layout("wild_park", TINY_WP).split(zoo.weights[:])
    nodes, edges, outputs = graph_of(builder(*batch(zoo)), 0)
    # nodes: input 0 | layer 0: 1, 2 | layer 1: 3 | layer 2: 4, 5 | fc outputs: 6, 7
    assert outputs == [6, 7]
    assert sorted(edges) == sorted([(0, 1), (0, 2), (1, 3), (2, 3), (3, 4), (3, 5), (4, 6), (4, 7), (5, 6), (5, 7),
                                    (1, 4), (2, 5)])  # the last two: the residual 0 -> 2, channel to channel
    one_hot_centre = [0.0] * 4 + [1.0] + [0.0] * 4  # 3x3 kernels: the centre is entry 4
    assert edges[(1, 4)] == edges[(2, 5)] == one_hot_centre
    np.testing.assert_allclose(edges[(3, 5)], W2[0, 1, 0].flatten().tolist(), atol=0)  # 3x3: W[o=1, i=0]
    np.testing.assert_allclose(edges[(2, 3)], [0.0] * 4 + [float(W1[0, 0, 1, 0, 0])] + [0.0] * 4)  # 1x1: centre
    np.testing.assert_allclose(edges[(5, 6)], [0.0] * 4 + [float(Wf[0, 0, 1])] + [0.0] * 4)  # fc: centre
    biases = [0.0, *b0[0].tolist(), *b1[0].tolist(), *b2[0].tolist(), *bf[0].tolist()]
    assert [nodes[n][0] for n in range(8)] == pytest.approx(biases)
    # positions: input channel 0 -> 0; hidden layers 0, 1, 2 -> 1, 2, 3 (shared by their channels); outputs 4, 5
    assert [nodes[n][1] for n in range(8)] == [0, 1, 1, 2, 3, 3, 4, 5]
    act = ACTIVATIONS.index
    assert [nodes[n][2] for n in range(8)] == [NO_ACTIVATION, act("relu"), act("relu"), act("tanh"), act("gelu"),
                                               act("gelu"), NO_ACTIVATION, NO_ACTIVATION]


def test_tiny_mlp_with_reverse_edges_written_out_by_hand():
    arch = {"in": 1, "hidden": 2, "out": 1}
    zoo = make_zoo("tiny_mlp", [arch], 1)
    (W1, b1), (W2, b2) = get_layout("tiny_mlp", arch).split(zoo.weights[:])
    nodes, edges, outputs = graph_of(GraphBuilder("tiny_mlp", [arch], reverse=True)(*batch(zoo)), 0)
    w = {(0, 1): W1[0, 0, 0], (0, 2): W1[0, 1, 0], (1, 3): W2[0, 0, 0], (2, 3): W2[0, 0, 1]}
    w = {k: float(v) for k, v in w.items()}
    assert len(edges) == 8 and outputs == [3]
    for (s, d), v in w.items():
        assert edges[(s, d)] == pytest.approx([v, 0.0, v])  # forward: [e, 0, e]
        assert edges[(d, s)] == pytest.approx([0.0, v, v])  # reverse: [0, e, e]
    assert [nodes[n][0] for n in range(4)] == pytest.approx([0.0, *b1[0].tolist(), *b2[0].tolist()])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("family", sorted(CASES))
def test_every_model_of_a_batch_equals_the_naive_graph(family, reverse):
    archs = CASES[family]
    zoo = make_zoo(family, archs, 7, task="regression", arch_ids=np.arange(7) * 2 % len(archs), seed=3)
    builder = GraphBuilder(family, archs, reverse=reverse)
    w, a = batch(zoo)
    g = builder(w, a)
    shape = builder.shape
    for b in range(len(zoo)):
        layout = get_layout(family, archs[a[b]])
        params = [(W[0].numpy(), bias[0].numpy()) for W, bias in layout.split(w[b:b + 1])]
        expected = naive_graph(layout, params, shape.kernel, reverse, shape.max_inputs, shape.max_hidden)
        assert_same_graph(graph_of(g, b), expected)
    assert g.num_graphs == len(zoo) and g.edge_x.shape[1] == shape.edge_dim


def test_the_zoo_kernel_pads_every_graph_and_wild_park_mixes_depths():
    builder = GraphBuilder("wild_park", WP_ARCHS)
    assert builder.shape.kernel == (5, 5) and builder.shape.max_hidden == 4 and builder.shape.max_inputs == 1
    assert GraphBuilder("small_cnn", CASES["small_cnn"]).shape.kernel == (3, 3)
    assert GraphBuilder("siren", [SIREN]).shape.kernel == (1, 1)


def test_a_mixed_batch_is_the_per_architecture_batches_concatenated():
    archs = WP_ARCHS
    ids = np.array([2, 0, 1, 0, 2, 2, 1, 0])
    zoo = make_zoo("wild_park", archs, len(ids), task="regression", arch_ids=ids, seed=4)
    builder = GraphBuilder("wild_park", archs, reverse=True)
    w, a = batch(zoo)
    mixed = builder(w, a)
    assert mixed.max_nodes == max(get_layout("wild_park", x).layers[0].units_in
                                  + sum(l.units_out for l in get_layout("wild_park", x).layers) for x in archs)
    for arch in range(len(archs)):
        rows = np.flatnonzero(ids == arch)
        alone = builder(w[rows], a[rows])
        for k, b in enumerate(rows):
            assert_same_graph(graph_of(mixed, int(b)), graph_of(alone, k))


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_permuted_model_gives_the_same_graph_relabelled(family):
    archs = CASES[family]
    zoo = make_zoo(family, archs, 4, task="regression", arch_ids=np.arange(4) % len(archs), seed=5)
    builder = GraphBuilder(family, archs, reverse=True)
    w, a = batch(zoo)
    g = builder(w, a)
    gen = torch.Generator().manual_seed(0)
    for b in range(len(zoo)):
        layout = get_layout(family, archs[a[b]])
        while True:  # small layers: redraw until the permutation moves something
            perms = layout.random_permutation(1, gen)
            if any((p[0] != torch.arange(p.shape[1])).any() for p in perms):
                break
        permuted = builder(layout.permute(w[b:b + 1], perms), a[b:b + 1])
        # node of new unit j of hidden layer l = the old node of unit perms[l][j]
        n_in = layout.layers[0].units_in
        old_of = list(range(n_in))
        start = n_in
        for l, layer in enumerate(layout.layers):
            old_of += [start + (int(perms[l][0, j]) if l < len(layout) - 1 else j) for j in range(layer.units_out)]
            start += layer.units_out
        new_nodes, new_edges, new_out = graph_of(permuted, 0)
        old_nodes, old_edges, old_out = graph_of(g, b)
        assert new_out == old_out
        relabelled_nodes = {old_of[n]: v for n, v in new_nodes.items()}
        relabelled_edges = {(old_of[s], old_of[d]): f for (s, d), f in new_edges.items()}
        assert_same_graph((relabelled_nodes, relabelled_edges, new_out), (old_nodes, old_edges, old_out))


def test_standardisation_is_one_scalar_per_role_pooled_over_architectures():
    archs = WP_ARCHS
    ids = np.array([0, 1, 2, 0, 1, 2, 1, 0, 2])
    zoo = make_zoo("wild_park", archs, len(ids), task="regression", arch_ids=ids, seed=6)
    builder = GraphBuilder("wild_park", archs)
    train = np.array([0, 2, 3, 5, 6, 8])
    builder.prepare(zoo, train)
    R = builder.shape.num_roles  # hidden layers 0..3, then the output layer
    pools = {(k, r): [] for k in ("w", "b") for r in range(R)}
    for i in train:
        layout = get_layout("wild_park", archs[ids[i]])
        for l, (W, bias) in enumerate(layout.split(zoo.weights[i:i + 1])):
            r = l if l < len(layout) - 1 else R - 1
            pools[("w", r)] += W.flatten().tolist()
            pools[("b", r)] += bias.flatten().tolist()
    for k, mean, std in (("w", builder.w_mean, builder.w_std), ("b", builder.b_mean, builder.b_std)):
        np.testing.assert_allclose(mean.numpy(), [np.mean(pools[(k, r)]) for r in range(R)], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std.numpy(), [np.std(pools[(k, r)]) for r in range(R)], rtol=1e-5)
    # and the graph reads standardised values: node feature = (bias - mean) / std of its role
    w, a = batch(zoo)
    nodes, _, _ = graph_of(builder(w, a), 1)  # arch 1: three convs then fc
    b0 = get_layout("wild_park", archs[1]).split(w[1:2])[0][1][0, 0]
    assert nodes[1][0] == pytest.approx(float((b0 - builder.b_mean[0]) / builder.b_std[0]), abs=1e-6)
    raw = GraphBuilder("wild_park", archs, standardize=False)
    raw.prepare(zoo, train)  # standardize off: the statistics stay the identity
    assert (raw.w_mean == 0).all() and (raw.w_std == 1).all() and (raw.b_mean == 0).all() and (raw.b_std == 1).all()


def test_degree_histogram_counts_in_degrees_weighted_by_models():
    archs = CASES["tiny_mlp"]  # 2 -> 3 -> 2 and 2 -> 4 -> 2
    builder = GraphBuilder("tiny_mlp", archs, reverse=True)
    hist = builder.degree_histogram([3, 1])
    # 2 -> 3 -> 2 with reverse edges: inputs receive from 3 hidden, hidden from 2 + 2, outputs from 3
    # 2 -> 4 -> 2: inputs from 4, hidden from 4, outputs from 4
    expected = np.zeros(5)
    expected[3] += 3 * 4  # 2 inputs + 2 outputs, 3 models
    expected[4] += 3 * 3 + 1 * 8
    np.testing.assert_array_equal(hist.numpy(), expected)


def test_dense_form_matches_a_loop_and_masks_padding():
    archs = CASES["tiny_mlp"]
    zoo = make_zoo("tiny_mlp", archs, 3, arch_ids=[1, 0, 1])
    g = GraphBuilder("tiny_mlp", archs)(*batch(zoo))
    node_h = torch.randn(g.node_x.shape[0], 3)
    edge_h = torch.randn(g.edge_x.shape[0], 2)
    fill = torch.tensor([7.0, -7.0])
    nodes, edges, mask, outputs = to_dense(g, node_h, edge_h, fill)
    assert nodes.shape == (3, 8, 3) and edges.shape == (3, 8, 8, 2)  # 2 + 4 + 2 nodes at most
    assert mask.sum(1).tolist() == [8, 7, 8]
    for n in range(len(node_h)):
        assert torch.equal(nodes[g.node_graph[n], g.node_local[n]], node_h[n])
    seen = torch.zeros(3, 8, 8, dtype=torch.bool)
    for e, (s, d) in enumerate(g.edge_index.T.tolist()):
        b = g.node_graph[s]
        assert torch.equal(edges[b, g.node_local[s], g.node_local[d]], edge_h[e])
        seen[b, g.node_local[s], g.node_local[d]] = True
    assert (edges[~seen] == fill).all()
    assert outputs.tolist() == [[6, 7], [5, 6], [6, 7]]
