"""The relational transformer (probegen/nn/relational.py): attention against a per-node, per-head loop;
padded nodes never change real nodes; node-relabelling equivariance."""

import torch

from probegen.nn.relational import RelationalTransformer, RTAttention


def naive_attention(att, x, e, mask):
    B, N, _ = x.shape
    H, dh = att.heads, att.d_hid // att.heads
    node = att.qkv_node(x).view(B, N, H, 3, dh)
    edge = att.qkv_edge(e).view(B, N, N, H, 4, dh)
    out = torch.zeros(B, N, H, dh)
    for b in range(B):
        for i in range(N):
            for h in range(H):
                keys = [j for j in range(N) if mask[b, j]]
                q = [node[b, i, h, 0] + edge[b, i, j, h, 0] for j in keys]
                k = [node[b, j, h, 1] + edge[b, i, j, h, 1] for j in keys]
                v = [node[b, j, h, 2] * edge[b, i, j, h, 3] + edge[b, i, j, h, 2] for j in keys]
                w = torch.softmax(torch.stack([qq @ kk for qq, kk in zip(q, k)]) / att.d_hid ** 0.5, 0)
                out[b, i, h] = sum(wi * vi for wi, vi in zip(w, v))
    return att.out(out.reshape(B, N, -1))


def test_attention_equals_a_loop_with_masked_keys():
    torch.manual_seed(0)
    att = RTAttention(6, 5, 8, heads=2)
    x, e = torch.randn(2, 4, 6), torch.randn(2, 4, 4, 5)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(att(x, e, mask), naive_attention(att, x, e, mask), rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_real_nodes():
    torch.manual_seed(0)
    rt = RelationalTransformer(8, 4, 16, 16, 8, layers=3, heads=4).eval()
    x, e = torch.randn(1, 5, 8), torch.randn(1, 5, 5, 4)
    padded_x = torch.cat([x, 100 * torch.randn(1, 3, 8)], 1)
    padded_e = 100 * torch.randn(1, 8, 8, 4)
    padded_e[:, :5, :5] = e
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(rt(padded_x, padded_e, mask)[:, :5], rt(x, e, torch.ones(1, 5, dtype=torch.bool)),
                                   rtol=1e-5, atol=1e-5)


def test_equivariant_to_relabelling_nodes():
    torch.manual_seed(0)
    rt = RelationalTransformer(8, 4, 16, 16, 8, layers=2, heads=2, dropout=0.2).eval()
    x, e = torch.randn(2, 6, 8), torch.randn(2, 6, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    perm = torch.randperm(6)
    with torch.no_grad():
        out = rt(x, e, mask)
        relabelled = rt(x[:, perm], e[:, perm][:, :, perm], mask)
    torch.testing.assert_close(relabelled, out[:, perm], rtol=1e-5, atol=1e-5)
    assert len(rt.layers) == 2 and rt.layers[0].edge_updates and not rt.layers[1].edge_updates
