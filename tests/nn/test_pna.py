"""PNA with FiLM edges (probegen/nn/pna.py) against a naive per-node loop, and node-relabelling
equivariance of the backbone."""

import math

import torch

from probegen.nn.pna import PNA, PNAConv


def random_graph(N=7, E=20, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, N - 1, (2, E), generator=gen)  # node N - 1 receives nothing
    return torch.randn(N, d, generator=gen), edge_index, torch.randn(E, d, generator=gen)


def naive_conv(conv, x, edge_index, e, avg_log_deg):
    N, d = x.shape
    W, b = conv.pre.weight, conv.pre.bias
    rows = []
    for i in range(N):
        msgs = []
        for k in range(edge_index.shape[1]):
            j, t = edge_index[:, k].tolist()
            if t == i:
                scale, shift = conv.film(e[k]).chunk(2)
                msgs.append(scale * (W @ torch.cat([x[i], x[j]]) + b) + shift)
        if msgs:
            m = torch.stack(msgs)
            var = (m * m).mean(0) - m.mean(0) ** 2
            std = torch.where(var > 1e-5, var.clamp(min=1e-5).sqrt(), torch.zeros_like(var))
            aggs = torch.cat([m.mean(0), m.min(0).values, m.max(0).values, std])
        else:
            aggs = torch.zeros(4 * d)
        amp = math.log(len(msgs) + 1) / avg_log_deg
        rows.append(torch.cat([x[i], aggs, amp * aggs]))
    return conv.lin(conv.post(torch.stack(rows)))


def test_conv_equals_a_per_node_loop():
    x, edge_index, e = random_graph()
    hist = torch.tensor([3.0, 5.0, 2.0, 1.0])  # degree histogram: mean log(deg + 1) normalises amplification
    avg_log = float((torch.log(torch.arange(4.0) + 1) * hist).sum() / hist.sum())
    torch.manual_seed(0)
    conv = PNAConv(4, 4, hist)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, edge_index, e), naive_conv(conv, x, edge_index, e, avg_log),
                                   rtol=1e-5, atol=1e-5)


def test_backbone_is_equivariant_to_relabelling_nodes_and_reordering_edges():
    x, edge_index, e = random_graph(N=9, E=30, d=8, seed=1)
    torch.manual_seed(0)
    gnn = PNA(8, 3, torch.tensor([1.0, 4.0, 4.0]), dropout=0.3).eval()
    perm = torch.randperm(9)  # new node n = old node perm[n]
    inv = torch.argsort(perm)
    order = torch.randperm(30)
    with torch.no_grad():
        out = gnn(x, edge_index, e)
        relabelled = gnn(x[perm], inv[edge_index][:, order], e[order])
    torch.testing.assert_close(relabelled, out[perm], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])  # not trivially constant


def test_backbone_layers_and_dropout():
    gnn = PNA(8, 4, torch.tensor([1.0, 2.0]), dropout=0.5)
    assert len(gnn.convs) == 4 and len(gnn.norms) == 3 and len(gnn.edge_updates) == 3  # no final edge update
    x, edge_index, e = random_graph(N=9, E=30, d=8, seed=2)
    torch.manual_seed(1)
    a = gnn.train()(x, edge_index, e)
    torch.manual_seed(2)
    b = gnn(x, edge_index, e)
    assert not torch.allclose(a, b)  # dropout acts in training
    gnn.eval()
    assert torch.equal(gnn(x, edge_index, e), gnn(x, edge_index, e))
