"""PNA message passing with FiLM edge modulation and edge updates: the backbone of NG-GNN (Kofinas et al.
2024; neural-graphs' nn/gnn.py, config model/pna.yaml: aggregators mean/min/max/std, scalers identity /
amplification, LayerNorm, SiLU, modulate_edges, update_edge_attr, no final edge update).

One layer, on the disjoint union of a batch's graphs (messages flow edge_index[0] -> edge_index[1]):

    m_ij   = gamma(e_ij) * (W [x_i, x_j] + b) + beta(e_ij)          FiLM: [gamma, beta] = Linear(e_ij)
    a_i    = [mean, min, max, std]_j m_ij  x  [1, log(deg_i + 1) / mean_train log(deg + 1)]
    x_i'   = Linear(Linear([x_i, a_i]))
    e_ij'  = Linear(SiLU(Linear(e_ij) + Linear(x_i') + Linear(x_j')))     (between layers)

Between layers the nodes go through LayerNorm, SiLU and dropout. LayerNorm here normalises each node over
its features; the reference's PyG LayerNorm is in 'graph' mode and, called without a batch vector,
normalises over the whole mini-batch at once, which makes a model's prediction depend on the other models
of its batch. W [x_i, x_j] is computed per node and gathered per edge (N d^2 instead of E d^2 work; the
same function).
"""

import torch
import torch.nn.functional as F
from torch import nn

AGGREGATORS = ["mean", "min", "max", "std"]
SCALERS = ["identity", "amplification"]


class PNAConv(nn.Module):
    def __init__(self, d, edge_dim, deg):
        # imported here: torch_geometric takes ~5 s to import, which every stage that only looks a method up
        # (the check stage, for one) would otherwise pay
        from torch_geometric.nn.aggr import DegreeScalerAggregation

        super().__init__()
        self.film = nn.Linear(edge_dim, 2 * d)
        self.pre = nn.Linear(2 * d, d)  # on [x_target, x_source]
        self.aggr = DegreeScalerAggregation(AGGREGATORS, SCALERS, deg)
        self.post = nn.Linear((len(AGGREGATORS) * len(SCALERS) + 1) * d, d)
        self.lin = nn.Linear(d, d)

    def forward(self, x, edge_index, e):
        """x (N, d), edge_index (2, E), e (E, edge_dim) -> (N, d)."""
        src, dst = edge_index
        d = x.shape[-1]
        to_target = F.linear(x, self.pre.weight[:, :d], self.pre.bias)  # (N, d)
        from_source = F.linear(x, self.pre.weight[:, d:])  # (N, d)
        scale, shift = self.film(e).chunk(2, -1)  # (E, d) each
        messages = scale * (to_target[dst] + from_source[src]) + shift  # (E, d)
        agg = self.aggr(messages, dst, dim_size=x.shape[0])  # (N, 8 d)
        return self.lin(self.post(torch.cat([x, agg], -1)))


class EdgeUpdate(nn.Module):
    """e_ij' = Linear(act(Linear(e_ij) + Linear(x_source) + Linear(x_target))): the reference's EdgeMLP
    (no residual, no norm)."""

    def __init__(self, d_edge, d_node):
        super().__init__()
        self.lin_e, self.lin_s, self.lin_t = nn.Linear(d_edge, d_edge), nn.Linear(d_node, d_edge), nn.Linear(
            d_node, d_edge)
        self.out = nn.Linear(d_edge, d_edge)

    def forward(self, x, edge_index, e):
        src, dst = edge_index
        return self.out(F.silu(self.lin_e(e) + self.lin_s(x)[src] + self.lin_t(x)[dst]))


class PNA(nn.Module):
    """`layers` PNAConv layers of width d (edge features also d wide); deg: in-degree histogram."""

    def __init__(self, d, layers, deg, dropout=0.0):
        super().__init__()
        self.convs = nn.ModuleList(PNAConv(d, d, deg) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers - 1))
        self.edge_updates = nn.ModuleList(EdgeUpdate(d, d) for _ in range(layers - 1))
        self.dropout = dropout

    def forward(self, x, edge_index, e):
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, e)  # (N, d)
            if i == len(self.convs) - 1:
                break  # the last layer's output goes to the readout as it is
            x = F.dropout(F.silu(self.norms[i](x)), self.dropout, self.training)
            e = self.edge_updates[i](x, edge_index, e)  # (E, d)
        return x
