"""The relational transformer of NG-T (Kofinas et al. 2024; neural-graphs' nn/relational_transformer.py,
config model/rtransformer.yaml: node_update_type rt, modulate_v, use_ln, no edge update in the last layer).

Dense over a padded node set: nodes (B, N, d_node), edges (B, N, N, d_edge) for every ordered pair (pairs
that are not edges carry the embedding of a zero edge feature, as in the reference), mask (B, N) of real
nodes. Every node attends to every real node of its graph; padding is never attended to (the reference
pads mixed-architecture batches without a mask, so padding leaks into the attention there).

    q_ij = Wq x_i + Qe e_ij     k_ij = Wk x_j + Ke e_ij     v_ij = (Wv x_j) * Me e_ij + Ve e_ij
    x_i  = LN(x_i + Linear(softmax_j(q_ij . k_ij / sqrt(d_attn)) v_ij))      per head, heads concatenated
    x_i  = LN(x_i + MLP(x_i))
    e_ij = LN(e_ij + Linear(GELU(Linear([e_ij, e_ji]) + Linear(x_i) + Linear(x_j))))
    e_ij = LN(e_ij + MLP(e_ij))                                              (all layers but the last)

Linear layers are Xavier-uniform with zero bias, as the reference initialises them.
"""

import torch
import torch.nn.functional as F
from torch import nn


def linear(d_in, d_out, bias=True):
    m = nn.Linear(d_in, d_out, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.zeros_(m.bias)
    return m


def mlp(d, d_hid, dropout):
    return nn.Sequential(linear(d, d_hid, bias=False), nn.GELU(), linear(d_hid, d), nn.Dropout(dropout))


class RTAttention(nn.Module):
    def __init__(self, d_node, d_edge, d_hid, heads, modulate_v=True):
        super().__init__()
        self.heads, self.d_hid, self.modulate_v = heads, d_hid, modulate_v
        self.qkv_node = linear(d_node, 3 * d_hid, bias=False)
        self.qkv_edge = linear(d_edge, (4 if modulate_v else 3) * d_hid, bias=False)
        self.out = linear(d_hid, d_node)
        self.scale = d_hid ** -0.5  # the reference scales by the full attention width, not per head

    def forward(self, x, e, mask):
        """x (B, N, d_node), e (B, N, N, d_edge), mask (B, N) -> (B, N, d_node)."""
        B, N, _ = x.shape
        H, dh = self.heads, self.d_hid // self.heads
        qn, kn, vn = self.qkv_node(x).view(B, N, H, 3, dh).unbind(3)  # (B, N, H, dh) each
        edge = self.qkv_edge(e).view(B, N, N, H, -1, dh).unbind(4)  # (B, N, N, H, dh) each
        q = qn[:, :, None] + edge[0]  # (B, i, j, H, dh): query of i
        k = kn[:, None] + edge[1]  # key of j
        v = vn[:, None] * edge[3] + edge[2] if self.modulate_v else vn[:, None] + edge[2]
        dots = self.scale * (q * k).sum(-1)  # (B, i, j, H)
        dots = dots.masked_fill(~mask[:, None, :, None], float("-inf"))
        attn = dots.softmax(2)
        out = torch.einsum("bijh,bijhd->bihd", attn, v)  # (B, N, H, dh)
        return self.out(out.reshape(B, N, self.d_hid))


class EdgeMLP(nn.Module):
    def __init__(self, d_node, d_edge, d_hid, dropout):
        super().__init__()
        self.lin_e, self.lin_s, self.lin_t = linear(2 * d_edge, d_hid), linear(d_node, d_hid), linear(d_node, d_hid)
        self.out, self.drop = linear(d_hid, d_edge), nn.Dropout(dropout)

    def forward(self, x, e):
        h = self.lin_e(torch.cat([e, e.transpose(1, 2)], -1))  # (B, N, N, d_hid): [e_ij, e_ji]
        h = h + self.lin_s(x)[:, :, None] + self.lin_t(x)[:, None]  # + source i, + target j
        return self.drop(self.out(F.gelu(h)))


class RTLayer(nn.Module):
    def __init__(self, d_node, d_edge, d_attn_hid, d_node_hid, d_edge_hid, heads, dropout, modulate_v=True,
                 edge_updates=True):
        super().__init__()
        self.attn = RTAttention(d_node, d_edge, d_attn_hid, heads, modulate_v)
        self.lin0, self.drop0 = linear(d_node, d_node), nn.Dropout(dropout)
        self.node_ln0, self.node_ln1 = nn.LayerNorm(d_node), nn.LayerNorm(d_node)
        self.node_mlp = mlp(d_node, d_node_hid, dropout)
        self.edge_updates = edge_updates
        if edge_updates:
            self.edge_mlp0 = EdgeMLP(d_node, d_edge, d_edge_hid, dropout)
            self.edge_mlp1 = mlp(d_edge, d_edge_hid, dropout)
            self.edge_ln0, self.edge_ln1 = nn.LayerNorm(d_edge), nn.LayerNorm(d_edge)

    def forward(self, x, e, mask):
        x = self.node_ln0(x + self.drop0(self.lin0(self.attn(x, e, mask))))
        x = self.node_ln1(x + self.node_mlp(x))
        if self.edge_updates:
            e = self.edge_ln0(e + self.edge_mlp0(x, e))
            e = self.edge_ln1(e + self.edge_mlp1(e))
        return x, e


class RelationalTransformer(nn.Module):
    def __init__(self, d_node, d_edge, d_attn_hid, d_node_hid, d_edge_hid, layers, heads, dropout=0.0,
                 modulate_v=True):
        super().__init__()
        self.layers = nn.ModuleList(
            RTLayer(d_node, d_edge, d_attn_hid, d_node_hid, d_edge_hid, heads, dropout, modulate_v,
                    edge_updates=i < layers - 1)  # the last layer's edges would never be read
            for i in range(layers))

    def forward(self, x, e, mask):
        for layer in self.layers:
            x, e = layer(x, e, mask)
        return x  # (B, N, d_node)
