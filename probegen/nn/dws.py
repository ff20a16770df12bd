"""DWSNets (Navon et al. 2023): layers equivariant to the hidden-neuron permutations of an MLP weight space.

A DWS layer maps every input tensor X (W_i or b_i, in set view: probegen/nn/weight_space.py) to every
output tensor Y (W_j or b_j): all weight->weight, weight->bias, bias->weight and bias->bias blocks. A block
is decided by S, the hidden groups X and Y share (inputs and outputs are fixed, folded into features):

    |S| = 0   pool X over all its sets, an MLP on the features, broadcast over Y's sets
    |S| = 1   pool X over its other set, a set layer along the shared axis (SAB or DeepSets), broadcast
              over Y's other set
    |S| = 2   X = Y = a middle weight: the four terms of the set x set layer (entry, row-pooled,
              column-pooled, all-pooled), averaged

Y is the sum over X divided by the number of tensors, as DWSNets' DWSLayer does. This is DWSNets' case
analysis (nn/layers/{weight,bias}_to_{weight,bias}.py: first/last layer, neighbouring, distant) read off
the shared groups instead of enumerated. With set_layer "ds" and reduction "mean" or "sum" the layer is
affine and spans every equivariant affine map (tests/nn/test_dws.py checks this against orbit counting).

    net = DWSNet(space, out_dim=10)         # DWSModelForClassification, neural-graphs' model/dwsnet.yaml
    logits = net(views, space)              # views: set views (B, *sets, fixed) per tensor, features 1
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from probegen.nn.weight_space import reduce


def mlp(f_in, f_out, fc_layers, bias=True):
    """DWSNets' _get_mlp: Linear, then (ReLU, Linear) x (fc_layers - 1)."""
    layers = [nn.Linear(f_in, f_out, bias=bias)]
    for _ in range(fc_layers - 1):
        layers += [nn.ReLU(), nn.Linear(f_out, f_out, bias=bias)]
    return nn.Sequential(*layers)


class SAB(nn.Module):
    """Set attention block (Lee et al. 2019) as DWSNets uses it: no layer norm, scores scaled by the full
    width. x (B, n, f_in) -> (B, n, f_out)."""

    def __init__(self, f_in, f_out, heads):
        super().__init__()
        if f_out % heads:
            raise ValueError(f"SAB width {f_out} is not a multiple of {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(f_in, f_out), nn.Linear(f_in, f_out), nn.Linear(f_in, f_out)
        self.o = nn.Linear(f_out, f_out)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, n, f)
        f = q.shape[-1]

        def split(t):
            return t.view(B, n, self.heads, f // self.heads).transpose(1, 2)  # (B, h, n, f / h)

        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(f), -1)  # (B, h, n, n)
        o = (q + attn @ v).transpose(1, 2).reshape(B, n, f)
        return o + F.relu(self.o(o))


class DeepSetLayer(nn.Module):
    """Gamma(x) - Lambda(reduce_n x): the DeepSets layer of DWSNets' SetLayer. x (B, n, f_in)."""

    def __init__(self, f_in, f_out, reduction, fc_layers):
        super().__init__()
        self.reduction = reduction
        self.gamma = mlp(f_in, f_out, fc_layers, bias=True)
        self.lam = mlp(f_in, f_out, fc_layers, bias=False)

    def forward(self, x):
        return self.gamma(x) - self.lam(reduce(x, [1], self.reduction).unsqueeze(1))


class SetBySetLayer(nn.Module):
    """W_i -> W_i for a middle layer, both axes permutable: DWSNets' SetKroneckerSetLayer.
    x (B, n1, n2, f_in) -> (B, n1, n2, f_out): (entry + row-pooled + column-pooled + all-pooled) / 4."""

    def __init__(self, f_in, f_out, reduction, fc_layers):
        super().__init__()
        self.reduction = reduction
        self.entry, self.rows, self.cols, self.both = (mlp(f_in, f_out, fc_layers) for _ in range(4))

    def forward(self, x):
        r = self.reduction
        return (self.entry(x) + self.rows(reduce(x, [1], r).unsqueeze(1)) + self.cols(reduce(x, [2], r).unsqueeze(2))
                + self.both(reduce(x, [1, 2], r)[:, None, None])) / 4


class Block(nn.Module):
    """One X -> Y block. Set views in, Y's set view out (broadcast as needed)."""

    def __init__(self, space, x, y, f_in, f_out, cfg, heads):
        super().__init__()
        tx, ty = space.tensors[x], space.tensors[y]
        self.x, self.y, self.reduction = x, y, cfg["reduction"]
        self.shared = tuple(g for g in ty.sets if g in tx.sets)  # in Y's axis order
        fx, fy = tx.fixed * f_in, ty.fixed * f_out
        if len(self.shared) == 0:
            self.op = mlp(fx, fy, cfg["fc_layers"])
        elif len(self.shared) == 1 and cfg["set_layer"] == "sab":
            self.op = SAB(fx, fy, heads)
        elif len(self.shared) == 1:
            self.op = DeepSetLayer(fx, fy, self.reduction, cfg["fc_layers"])
        else:
            self.op = SetBySetLayer(fx, fy, self.reduction, cfg["fc_layers"])

    def forward(self, v, space):
        """-> (B, *shared sizes, fy): broadcasting onto Y's other sets is left to the layer."""
        return self.op(space.pool(v, self.x, self.shared, self.reduction))


class DWSLayer(nn.Module):
    """All blocks between all tensors; features f_in -> f_out per fixed entry."""

    def __init__(self, space, f_in, f_out, cfg, heads):
        super().__init__()
        n = len(space)
        self.blocks = nn.ModuleList(Block(space, x, y, f_in, f_out, cfg, heads) for y in range(n) for x in range(n))
        self.n = n
        _init_dws(self, cfg["init_scale"])

    def forward(self, views, space):
        # Blocks into the same Y through the same shared axes are summed before broadcasting, and the
        # broadcasts are added to the full-size term (X = Y is always one): no expanded copies.
        pooled, parts = {}, {}  # (x, shared) -> X pooled onto the shared axes; (y, shared) -> summed outputs
        for block in self.blocks:
            read = (block.x, block.shared)
            if read not in pooled:
                pooled[read] = space.pool(views[block.x], block.x, block.shared, block.reduction)
            z = block.op(pooled[read])  # (B, *shared sizes, fy)
            key = (block.y, block.shared)
            parts[key] = z if key not in parts else parts[key] + z
        out = [None] * self.n
        for (y, shared), z in sorted(parts.items(), key=lambda item: -len(item[0][1])):
            z = space.broadcast(z, shared, y)
            out[y] = z if out[y] is None else out[y] + z
        return [space.full(o, y) / self.n for y, o in enumerate(out)]  # DWSNets divides by the tensor count


def _init_dws(layer, scale):
    """DWSNets' DWSLayer init: Xavier-normal x sqrt(2 in / out) x scale; biases U(-1e-4, 1e-4)."""
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            nn.init.xavier_normal_(m.weight)
            with torch.no_grad():
                m.weight.mul_(math.sqrt(2 * in_f / out_f) * scale)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -1e-4, 1e-4)


class SetNorm(nn.Module):
    """BatchNorm1d per tensor over its F features (statistics over models and all entries)."""

    def __init__(self, n, features):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(features) for _ in range(n))
        self.features = features

    def forward(self, views):
        return [m(v.reshape(-1, self.features)).reshape(v.shape) for m, v in zip(self.norms, views)]


class DWSNet(nn.Module):
    """DWSModelForClassification: `layers` DWS layers (BN, ReLU, dropout between), then ReLU, dropout and
    the invariant readout: every tensor pooled over its set axes, concatenated, an MLP of `out_fc_layers`."""

    def __init__(self, space, out_dim, *, hidden=32, layers=5, reduction="max", set_layer="sab", heads=8,
                 fc_layers=1, out_fc_layers=1, bn=True, dropout=0.0, init_scale=1.0, in_features=1):
        super().__init__()
        cfg = {"reduction": reduction, "set_layer": set_layer, "fc_layers": fc_layers, "init_scale": init_scale}
        widths = [in_features] + [hidden] * layers
        # DWSNets' last equivariant layer uses one attention head
        self.layers = nn.ModuleList(DWSLayer(space, a, b, cfg, heads if i < layers - 1 else 1)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        self.norms = nn.ModuleList(SetNorm(len(space), hidden) if bn else nn.Identity() for _ in range(layers - 1))
        self.dropout = nn.Dropout(dropout)
        self.reduction = reduction
        readout = sum(t.fixed for t in space.tensors) * hidden
        self.readout = mlp(readout, out_dim, out_fc_layers)

    def forward(self, views, space):
        """views: set views (B, *sets, fixed) of the standardised tensors -> (B, out_dim)."""
        views = self.layers[0](views, space)
        for norm, layer in zip(self.norms, self.layers[1:]):
            views = [self.dropout(F.relu(v)) for v in norm(views)]
            views = layer(views, space)
        views = [self.dropout(F.relu(v)) for v in views]
        pooled = [space.invariant(v, k, self.reduction) for k, v in enumerate(views)]  # (B, fixed * hidden)
        return self.readout(torch.cat(pooled, -1))
