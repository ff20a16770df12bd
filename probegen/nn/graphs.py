"""Networks as graphs (Kofinas et al., ICLR 2024, "Graph Neural Networks for Learning Equivariant
Representations of Neural Networks"), built from the declared layout (probegen/nets/layout.py).

Nodes are the units of the layout: the input units of the first layer, then every layer's output units
(neurons of a linear layer, channels of a convolution). Every layer contributes one edge per (input unit,
output unit) pair:

    node feature   the unit's bias, 0 for input units                                  (N, 1)
    edge feature   W[o, i] (linear) or the kh x kw kernel slice W[o, i] zero-padded centrally to the zoo's
                   largest kernel KH x KW and flattened: a linear weight sits at the kernel centre  (E, KH*KW)
    residual       a Wild Park connection r -> l becomes edges from channel c of layer r to channel c of
                   layer l for the channels both have, carrying the identity kernel (centre 1)
    reverse        optional: every edge i -> j also as j -> i; features [e, 0, e] forward and [0, e, e]
                   backward (the reference's [E, E^T, E + E^T] on the adjacency)
    position       a table index: one per input unit, one per hidden layer (its units share it and stay
                   permutable), one per output unit
    activation     hidden units: the index of their layer's activation; inputs and outputs: NO_ACTIVATION

Weights and biases are standardised before they become features, with one scalar mean / std per role
(weights or biases of hidden layer l, of the output layer), pooled over the training models of every
architecture: constant along every permutable axis, so the graph of a permuted model is the same graph
with its nodes relabelled.

Per architecture the structure (edge_index, positions, activations, output nodes) is a Template computed
once and cached; a batch of models of one architecture is their per-layer tensors (Layout.split) reshaped
to edge blocks plus node-index offsets, and a batch that mixes architectures is one such block per
architecture present (Wild Park), concatenated. No Python loop runs over models.

    builder = GraphBuilder("wild_park", archs, reverse=False)
    builder.prepare(zoo, train_idx)            # the standardisation statistics
    g = builder(weights, arch_ids)             # GraphBatch: all graphs of the batch, PyG-style offsets
    dense = to_dense(g, node_h, edge_h, fill)  # (B, N_max, d), (B, N_max, N_max, d_e), mask: for attention
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from probegen.errors import ProbegenError
from probegen.flops import count_flops
from probegen.nets import get_layout, per_layer

# Activation vocabulary of the activation embedding: the reference's, plus sin for SIRENs.
ACTIVATIONS = ("none", "relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "sin")
NO_ACTIVATION = len(ACTIVATIONS)  # input and output units: a zero embedding


@dataclass(frozen=True)
class ZooShape:
    """What every graph of a zoo shares: the padded kernel, the position table, the number of statistics."""
    kernel: tuple  # (KH, KW): the largest kernel of the zoo, (1, 1) without convolutions
    max_inputs: int
    max_hidden: int  # hidden layers of the deepest architecture
    max_outputs: int
    reverse: bool

    @property
    def kernel_size(self):
        return self.kernel[0] * self.kernel[1]

    @property
    def edge_dim(self):
        return self.kernel_size * (3 if self.reverse else 1)

    @property
    def num_positions(self):
        return self.max_inputs + self.max_hidden + self.max_outputs

    @property
    def num_roles(self):
        return self.max_hidden + 1  # hidden layers 0 .. max_hidden - 1, then the output layer


def zoo_shape(layouts, reverse):
    kernels = [l.kernel for lay in layouts for l in lay.layers if l.kind == "conv"]
    return ZooShape(kernel=(max((k[0] for k in kernels), default=1), max((k[1] for k in kernels), default=1)),
                    max_inputs=max(lay.layers[0].units_in for lay in layouts),
                    max_hidden=max(len(lay) - 1 for lay in layouts),
                    max_outputs=max(lay.layers[-1].units_out for lay in layouts), reverse=bool(reverse))


def role(layout, l, shape):
    """Statistics slot of layer l: its hidden index, or the output layer's slot (shared by every depth)."""
    return l if l < len(layout) - 1 else shape.max_hidden


# ------------------------------------------------------------------------------------------- templates


@dataclass
class Template:
    """One architecture's graph structure (no weights). Edges are ordered as the features are built:
    per layer (input unit major, output unit minor), then residual edges, then (optionally) all reversed."""
    num_nodes: int
    edge_index: torch.Tensor  # (2, E) long: source, target
    node_pos: torch.Tensor  # (N,) long: row of the position table
    node_act: torch.Tensor  # (N,) long: activation index, NO_ACTIVATION for inputs and outputs
    output_nodes: torch.Tensor  # (n_out,) long, in output-unit order

    def to(self, device):
        return Template(self.num_nodes, self.edge_index.to(device), self.node_pos.to(device),
                        self.node_act.to(device), self.output_nodes.to(device))


def node_offsets(layout):
    """First node of each unit group: inputs, then each layer's outputs; the last entry is N."""
    sizes = [layout.layers[0].units_in] + [l.units_out for l in layout.layers]
    return [0] + torch.tensor(sizes).cumsum(0).tolist()


def check_activations(layout):
    for l in layout.layers[:-1]:
        if l.activation not in ACTIVATIONS:
            raise ProbegenError(f"graph: layer {l.name}: activation {l.activation!r} has no embedding; "
                                f"known: {list(ACTIVATIONS)}")


def build_template(layout, shape):
    check_activations(layout)
    off = node_offsets(layout)
    blocks = []
    for l, layer in enumerate(layout.layers):
        src = torch.arange(off[l], off[l + 1]).repeat_interleave(layer.units_out)  # input unit major
        dst = torch.arange(off[l + 1], off[l + 2]).repeat(layer.units_in)
        blocks.append(torch.stack([src, dst]))
    for l, layer in enumerate(layout.layers):
        if layer.residual >= 0:  # channel c of layer r's output -> channel c of layer l's, c < m
            c = torch.arange(min(layout.layers[layer.residual].units_out, layer.units_out))
            blocks.append(torch.stack([off[layer.residual + 1] + c, off[l + 1] + c]))
    edge_index = torch.cat(blocks, 1)
    if shape.reverse:
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
    n_in, n_out = layout.layers[0].units_in, layout.layers[-1].units_out
    pos = [torch.arange(n_in)]
    act = [torch.full((n_in,), NO_ACTIVATION)]
    for l, layer in enumerate(layout.layers[:-1]):
        pos.append(torch.full((layer.units_out,), shape.max_inputs + l))
        act.append(torch.full((layer.units_out,), ACTIVATIONS.index(layer.activation)))
    pos.append(shape.max_inputs + shape.max_hidden + torch.arange(n_out))
    act.append(torch.full((n_out,), NO_ACTIVATION))
    return Template(off[-1], edge_index, torch.cat(pos), torch.cat(act), torch.arange(off[-2], off[-1]))


# ------------------------------------------------------------------------------------------- features


def layer_edge_features(W, shape):
    """W (b, out, in[, kh, kw]) -> (b, in * out, KH * KW): edge (i, o) carries W[o, i] padded centrally."""
    if W.dim() == 3:
        W = W[..., None, None]  # a linear weight is a 1 x 1 kernel: it lands on the centre
    kh, kw = W.shape[-2:]
    KH, KW = shape.kernel
    ph, pw = (KH - kh) // 2, (KW - kw) // 2
    W = F.pad(W, (pw, KW - kw - pw, ph, KH - kh - ph))  # (b, out, in, KH, KW)
    return W.transpose(1, 2).flatten(3).flatten(1, 2)  # (b, in * out, KH * KW)


def graph_features(layout, layers, shape, stats):
    """One architecture's models -> node features (b, N) and edge features (b, E, edge_dim), raw weights
    standardised with stats = (w_mean, w_std, b_mean, b_std), each (num_roles,)."""
    w_mean, w_std, b_mean, b_std = stats
    b = layers[0][0].shape[0]
    nodes = [layers[0][0].new_zeros(b, layout.layers[0].units_in)]
    edges = []
    for l, (W, bias) in enumerate(layers):
        r = role(layout, l, shape)
        nodes.append((bias - b_mean[r]) / b_std[r])
        edges.append(layer_edge_features((W - w_mean[r]) / w_std[r], shape))
    centre = (shape.kernel[0] // 2) * shape.kernel[1] + shape.kernel[1] // 2
    identity = layers[0][0].new_zeros(shape.kernel_size)
    identity[centre] = 1.0
    for layer in layout.layers:
        if layer.residual >= 0:
            m = min(layout.layers[layer.residual].units_out, layer.units_out)
            edges.append(identity.expand(b, m, -1))
    e = torch.cat(edges, 1)  # (b, E_forward, KH*KW)
    if shape.reverse:
        zero = torch.zeros_like(e)
        e = torch.cat([torch.cat([e, zero, e], 2), torch.cat([zero, e, e], 2)], 1)  # (b, 2 E_forward, 3 KH*KW)
    return torch.cat(nodes, 1), e


# ------------------------------------------------------------------------------------------- batches


@dataclass
class GraphBatch:
    """All graphs of a batch as one disjoint graph (PyG's convention: sources edge_index[0], targets [1])."""
    node_x: torch.Tensor  # (N_total, 1) standardised biases
    edge_x: torch.Tensor  # (E_total, edge_dim)
    edge_index: torch.Tensor  # (2, E_total) long, global node ids
    node_pos: torch.Tensor  # (N_total,) long
    node_act: torch.Tensor  # (N_total,) long
    node_graph: torch.Tensor  # (N_total,) long: the node's model, its position in the input batch
    node_local: torch.Tensor  # (N_total,) long: the node's index within its graph
    output_nodes: torch.Tensor  # (B, n_out) long global ids, in input batch order
    num_graphs: int
    max_nodes: int


class GraphBuilder(nn.Module):
    """Builds the GraphBatch of a batch of packed rows; holds the standardisation statistics (buffers)."""

    def __init__(self, family, archs, reverse=False, standardize=True):
        super().__init__()
        self.family, self.archs, self.standardize = family, list(archs), bool(standardize)
        layouts = [get_layout(family, a) for a in self.archs]
        outs = {lay.layers[-1].units_out for lay in layouts}
        if len(outs) != 1:
            raise ProbegenError(f"graph: the architectures have different output sizes {sorted(outs)}; "
                                "the readout concatenates the output units")
        self.shape = zoo_shape(layouts, reverse)
        self.num_outputs = outs.pop()
        for lay in layouts:  # fail early, in __init__, on an activation without an embedding
            check_activations(lay)
        R = self.shape.num_roles
        for name, value in (("w_mean", 0.0), ("w_std", 1.0), ("b_mean", 0.0), ("b_std", 1.0)):
            self.register_buffer(name, torch.full((R,), value))
        self._templates = {}  # (arch index, device) -> Template; structure only, not state

    def template(self, a, device):
        key = (a, str(device))
        if key not in self._templates:
            cpu = self._templates.get((a, "cpu")) or build_template(get_layout(self.family, self.archs[a]),
                                                                    self.shape)
            self._templates[(a, "cpu")] = cpu
            self._templates[key] = cpu.to(device)
        return self._templates[key]

    def degree_histogram(self, arch_counts):
        """In-degree histogram of the zoo's graphs (PNA's scalers normalise by its mean log-degree): each
        architecture's node degrees, weighted by how many zoo models use it."""
        per_arch = []
        for a, count in enumerate(arch_counts):
            if count:
                t = self.template(a, "cpu")
                node_deg = torch.bincount(t.edge_index[1], minlength=t.num_nodes)  # (N,)
                per_arch.append(torch.bincount(node_deg).double() * count)  # (max degree + 1,)
        size = max(len(h) for h in per_arch)
        return sum(F.pad(h, (0, size - len(h))) for h in per_arch)

    @torch.no_grad()
    def prepare(self, zoo, train_idx):
        """Scalar mean and std of each role's weights and biases over the training models (float64 sums)."""
        if not self.standardize:
            return
        from probegen.methods.base import iter_rows  # here: probegen.methods imports the methods, which import us
        R = self.shape.num_roles
        sums = torch.zeros(4, R, dtype=torch.float64)  # weight sum, weight sq sum, bias sum, bias sq sum
        counts = torch.zeros(2, R, dtype=torch.float64)
        for weights, arch_ids in iter_rows(zoo, train_idx):
            for _, _, layout, layers in per_layer(self.family, self.archs, weights, arch_ids):
                for l, (W, b) in enumerate(layers):
                    r = role(layout, l, self.shape)
                    for k, t in enumerate((W.double(), b.double())):
                        sums[2 * k, r] += t.sum()
                        sums[2 * k + 1, r] += (t * t).sum()
                        counts[k, r] += t.numel()
        for k, (mean_buf, std_buf) in enumerate(((self.w_mean, self.w_std), (self.b_mean, self.b_std))):
            n = counts[k].clamp(min=1)
            mean = sums[2 * k] / n
            std = (sums[2 * k + 1] / n - mean * mean).clamp(min=0).sqrt()
            mean_buf.copy_(torch.where(counts[k] > 0, mean, 0.0))
            std_buf.copy_(torch.where((counts[k] > 0) & (std > 1e-12), std, 1.0))

    def forward(self, weights, arch_ids):
        """weights (B, D), arch_ids (B,) -> GraphBatch; graphs are grouped by architecture internally, and
        output_nodes / node_graph refer back to the input order."""
        B, device = weights.shape[0], weights.device
        stats = (self.w_mean, self.w_std, self.b_mean, self.b_std)
        parts, base, max_nodes = [], 0, 0
        output_nodes = torch.empty(B, self.num_outputs, dtype=torch.long, device=device)
        for a, rows, layout, layers in per_layer(self.family, self.archs, weights, arch_ids):
            t = self.template(a, device)
            node_x, edge_x = graph_features(layout, layers, self.shape, stats)  # (b, N), (b, E, F)
            b, N = node_x.shape
            offset = base + torch.arange(b, device=device) * N  # (b,) first node of each graph
            parts.append((node_x.reshape(-1, 1), edge_x.reshape(-1, edge_x.shape[-1]),
                          (t.edge_index[:, None, :] + offset[None, :, None]).reshape(2, -1),
                          t.node_pos.repeat(b), t.node_act.repeat(b), rows.repeat_interleave(N),
                          torch.arange(N, device=device).repeat(b)))
            output_nodes[rows] = t.output_nodes[None, :] + offset[:, None]
            base, max_nodes = base + b * N, max(max_nodes, N)
        cat = [torch.cat(p, 1 if i == 2 else 0) for i, p in enumerate(zip(*parts))]
        return GraphBatch(*cat, output_nodes=output_nodes, num_graphs=B, max_nodes=max_nodes)


def to_dense(g, node_h, edge_h, fill):
    """Padded dense form for attention: node_h (N_total, d) -> (B, N_max, d); edge_h (E_total, d_e) ->
    (B, N_max, N_max, d_e) with `fill` (d_e,) at every pair that is not an edge (the embedding of a zero
    edge feature, as the reference's dense adjacency gives); mask (B, N_max) marks real nodes; outputs
    (B, n_out) the output nodes' local indices."""
    B, N = g.num_graphs, g.max_nodes
    nodes = node_h.new_zeros(B, N, node_h.shape[-1])
    nodes[g.node_graph, g.node_local] = node_h
    edges = fill.expand(B, N, N, fill.shape[-1]).clone()
    src, dst = g.edge_index
    edges[g.node_graph[src], g.node_local[src], g.node_local[dst]] = edge_h
    mask = torch.zeros(B, N, dtype=torch.bool, device=node_h.device)
    mask[g.node_graph, g.node_local] = True
    return nodes, edges, mask, g.node_local[g.output_nodes]


# ------------------------------------------------------------------------------------------- encoder


class FourierFeatures(nn.Module):
    """Random Fourier features (the reference's rff GaussianEncoding): v (..., n) -> [cos 2 pi v B^T,
    sin 2 pi v B^T] (..., 2 size), B (size, n) ~ N(0, sigma^2), fixed at initialisation."""

    def __init__(self, in_dim, size, sigma):
        super().__init__()
        self.register_buffer("B", torch.randn(size, in_dim) * sigma)

    def forward(self, v):
        # float32 even under autocast: cos / sin of arguments of tens of radians would be noise in bf16
        with torch.autocast(v.device.type, enabled=False):
            p = 2 * math.pi * v.float() @ self.B.T  # (..., size)
            return torch.cat([torch.cos(p), torch.sin(p)], -1)


class GraphEncoder(nn.Module):
    """Initial node and edge embeddings: scalars through random Fourier features and a Linear, then a
    Linear (the reference's proj_bias / proj_weight, proj_node_in / proj_edge_in); nodes add their position
    and (optionally) activation embeddings."""

    def __init__(self, shape, d_node, d_edge, fourier_dim=128, sigma=3.0, act_embed=True):
        super().__init__()
        self.node_rff, self.edge_rff = FourierFeatures(1, fourier_dim, sigma), FourierFeatures(
            shape.edge_dim, fourier_dim, sigma)
        self.node_proj = nn.Sequential(nn.Linear(2 * fourier_dim, d_node), nn.Linear(d_node, d_node))
        self.edge_proj = nn.Sequential(nn.Linear(2 * fourier_dim, d_edge), nn.Linear(d_edge, d_edge))
        self.pos = nn.Parameter(torch.randn(shape.num_positions, d_node))
        self.act = nn.Embedding(NO_ACTIVATION + 1, d_node, padding_idx=NO_ACTIVATION) if act_embed else None

    def nodes(self, g):
        h = self.node_proj(self.node_rff(g.node_x)) + self.pos[g.node_pos]  # (N_total, d_node)
        return h + self.act(g.node_act) if self.act is not None else h

    def edges(self, x):
        return self.edge_proj(self.edge_rff(x))  # (..., d_edge)


# ------------------------------------------------------------------------------------------- costs


def flops_per_arch(method):
    """Forward FLOPs of a graph method on one model of each architecture the zoo uses ([0] for the
    unused), counted (probegen.flops) around the method's own forward on a zero row: graph sizes, and so
    FLOPs, depend on the architecture only."""
    device = next(method.parameters()).device
    was_training = method.training
    method.eval()
    out = []
    for a, count in enumerate(method.arch_counts):
        if not count:
            out.append(0)
            continue
        with torch.no_grad():
            out.append(count_flops(lambda: method(torch.zeros(1, method.dim, device=device),
                                                  torch.tensor([a], device=device))))
    method.train(was_training)
    return out


def check_cfg(name, cfg, positive=(), fractions=()):
    """One ProbegenError line for a bad value: positive integers and fractions in [0, 1)."""
    for key in positive:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ProbegenError(f"method.{name}: {key}: expected a positive integer, got {v!r}")
    for key in fractions:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ProbegenError(f"method.{name}: {key}: expected a number in [0, 1), got {v!r}")
