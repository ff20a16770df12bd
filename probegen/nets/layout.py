"""Weight structure: what every consumer of a zoo's weights knows about an architecture, declared once.

Each architecture family declares, per architecture, a Layout: its layers in forward order, each with

    name         the state-dict prefix ("seq.0", "convs.1", "layers.2", "fc")
    kind         "linear" (weight (out, in)) or "conv" (weight (out, in, kh, kw)); axis 0 of the weight
                 and the bias are the layer's output units (neurons / channels), axis 1 its input units
    activation   applied to the layer's output ("sin", "relu", ..., "none" for the last layer)
    residual     Wild Park only: an earlier layer whose post-activation output is added to this layer's
                 pre-activation on the channels both have (-1: none)

A packed row is the layers' (weight, bias) flattened back to back in that order (state_dict order and
layout). From the layers alone follow the parameter shapes, the per-layer views of a batch of rows, and the
**symmetry**: which hidden units may be permuted without changing the function. Hidden units are the
outputs of every layer but the last (the input units of layer 0 and the output units of the last layer
keep their order). A plain chain permutes each hidden layer freely. A residual connection r -> i adds
channel c of layer r to channel c of layer i for c < min(c_r, c_i), so those channels must move together:
the channels split into segments, and tied segments (a "tie" = one symmetry group) take one permutation.

    layout = get_layout("wild_park", arch)     # probegen.nets.get_layout: cached per architecture
    layers = layout.split(rows)                 # [(W (B, *weight), b (B, out))], views into rows (B, D)
    perms = layout.random_permutation(B, gen)  # [(B, c_l)] per hidden layer, ties respected
    permuted = layout.permute(rows, perms)     # the same functions, hidden units reordered

Every consumer works from this: the batched forwards, the readers' shape checks, StatNN's statistics, the
graph constructors and equivariant layers of the weight-space baselines, the alignment of localize, and the
tests' random function-preserving permutations.
"""

import math
from dataclasses import dataclass

import torch

from probegen.errors import ProbegenError

KINDS = ("linear", "conv")


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    weight: tuple  # (out, in) or (out, in, kh, kw)
    activation: str = "none"
    residual: int = -1

    @property
    def bias(self):
        return (self.weight[0],)

    @property
    def units_out(self):
        return self.weight[0]

    @property
    def units_in(self):
        return self.weight[1]

    @property
    def kernel(self):
        """Spatial kernel shape: () for a linear layer, (kh, kw) for a convolution."""
        return tuple(self.weight[2:])


@dataclass(frozen=True)
class Segment:
    """Channels [start, end) of one hidden layer; segments with the same `tie` share one permutation."""
    start: int
    end: int
    tie: int


class Layout:
    def __init__(self, layers):
        self.layers = tuple(layers)
        _check(self.layers)
        self.param_shapes = [(f"{l.name}.{p}", shape) for l in self.layers
                             for p, shape in (("weight", l.weight), ("bias", l.bias))]
        self.sizes = [math.prod(shape) for _, shape in self.param_shapes]
        self.num_params = sum(self.sizes)
        self.segments = _segments(self.layers)  # per hidden layer: [Segment]
        self.num_ties = 1 + max((s.tie for segs in self.segments for s in segs), default=-1)

    def __len__(self):
        return len(self.layers)

    @property
    def hidden(self):
        """Indices of the layers whose outputs are hidden units: all but the last."""
        return range(len(self.layers) - 1)

    # ------------------------------------------------------------------------------------ per-layer views

    def split(self, rows):
        """rows (B, D >= num_params) -> [(W (B, *weight), b (B, out))] per layer: views, padding ignored."""
        if rows.shape[-1] < self.num_params:
            raise ProbegenError(f"layout: rows have {rows.shape[-1]} columns, the architecture {self.num_params}")
        B, out, start = rows.shape[0], [], 0
        for (_, shape), size in zip(self.param_shapes, self.sizes):
            out.append(rows[:, start:start + size].reshape(B, *shape))
            start += size
        return list(zip(out[0::2], out[1::2]))

    def flatten(self, layers):
        """Inverse of split: [(W, b)] -> rows (B, num_params)."""
        return torch.cat([t.flatten(1) for W, b in layers for t in (W, b)], 1)

    # ----------------------------------------------------------------------------------------- symmetry

    def permute(self, rows, perms):
        """Rows (B, D) with hidden units reordered: new unit j of hidden layer l = old unit perms[l][:, j].

        Moves unit j's row of W_l and entry of b_l, and its column of every layer reading layer l (the next
        layer). Function-preserving for elementwise activations when perms respect the ties (check_perms).
        Columns beyond num_params (zero padding) are kept as they are."""
        self.check_perms(perms)
        layers = self.split(rows)
        new = []
        for l, (W, b) in enumerate(layers):
            if l in self.hidden:
                W, b = take(W, perms[l], 1), take(b, perms[l], 1)
            if l > 0:
                W = take(W, perms[l - 1], 2)
            new.append((W, b))
        packed = self.flatten(new)
        return torch.cat([packed, rows[:, packed.shape[1]:]], 1)

    def random_permutation(self, B, generator=None):
        """[(B, c_l)] per hidden layer: a uniformly random function-preserving permutation per row.
        One permutation per tie and row, applied to every segment of that tie."""
        draws = {}
        for segs in self.segments:
            for s in segs:
                if s.tie not in draws:
                    n = s.end - s.start
                    draws[s.tie] = torch.argsort(torch.rand(B, n, generator=generator), 1)  # (B, n)
        return [torch.cat([draws[s.tie] + s.start for s in segs], 1) for segs in self.segments]

    def check_perms(self, perms):
        """Raise unless perms ([(B, c_l)] per hidden layer) keep every segment and agree across ties."""
        if len(perms) != len(self.segments):
            raise ProbegenError(f"layout: {len(perms)} permutations for {len(self.segments)} hidden layers")
        ties = {}
        for l, (p, segs) in enumerate(zip(perms, self.segments)):
            if p.shape[-1] != self.layers[l].units_out:
                raise ProbegenError(f"layout: layer {self.layers[l].name} has {self.layers[l].units_out} units, "
                                    f"its permutation {p.shape[-1]}")
            for s in segs:
                local = p[:, s.start:s.end] - s.start  # (B, n) must permute 0..n-1
                if (local < 0).any() or (local >= s.end - s.start).any():
                    raise ProbegenError(f"layout: a permutation of {self.layers[l].name} moves channels across "
                                        f"the residual segment [{s.start}, {s.end})")
                if not torch.equal(ties.setdefault(s.tie, local), local):
                    raise ProbegenError(f"layout: tied channels of {self.layers[l].name} [{s.start}, {s.end}) "
                                        "are permuted differently from the layer they are tied to")

    def ties(self):
        """{tie: [(hidden layer, Segment)]}: the symmetry groups and where they act."""
        out = {}
        for l, segs in enumerate(self.segments):
            for s in segs:
                out.setdefault(s.tie, []).append((l, s))
        return out


def take(x, perm, axis):
    """x (B, ...) reordered along `axis` by a per-row permutation perm (B, n): out[b] = x[b] index perm[b]."""
    shape = [1] * x.dim()
    shape[0], shape[axis] = perm.shape[0], perm.shape[1]
    index = perm.to(x.device).view(shape).expand(*x.shape[:axis], perm.shape[1], *x.shape[axis + 1:])
    return x.gather(axis, index)


def _check(layers):
    if not layers:
        raise ProbegenError("layout: an architecture needs at least one layer")
    for i, l in enumerate(layers):
        if l.kind not in KINDS or len(l.weight) != (2 if l.kind == "linear" else 4):
            raise ProbegenError(f"layout: layer {l.name}: kind {l.kind!r} with weight shape {l.weight}")
        if i and layers[i - 1].units_out != l.units_in:
            raise ProbegenError(f"layout: layer {l.name} reads {l.units_in} units, "
                                f"{layers[i - 1].name} writes {layers[i - 1].units_out}")
        if l.residual >= 0 and not l.residual < i - 1:
            raise ProbegenError(f"layout: layer {l.name} takes a residual from layer {l.residual}; "
                                f"it must come from before layer {i - 1}")
        if l.residual >= 0 and i == len(layers) - 1:
            raise ProbegenError(f"layout: the output layer {l.name} cannot take a residual")


def _segments(layers):
    """Per hidden layer, its channels cut into segments, tied across residual connections.

    A link r -> i ties channels [0, m) of r and i, m = min(c_r, c_i). Cuts: 0, c_l, and every m of a
    link at either end; then cuts are copied across links below their m until nothing changes, so that
    tied ranges are cut identically. Segments are the ranges between cuts; union-find over links joins
    each segment [a, b) of r below m with the segment [a, b) of i."""
    hidden = range(len(layers) - 1)
    links = [(l.residual, i, min(layers[l.residual].units_out, l.units_out))
             for i, l in enumerate(layers) if l.residual >= 0]
    cuts = {h: {0, layers[h].units_out} for h in hidden}
    for r, i, m in links:
        cuts[r].add(m)
        cuts[i].add(m)
    changed = True
    while changed:
        changed = False
        for r, i, m in links:
            below = {c for c in cuts[r] | cuts[i] if c <= m}
            for h in (r, i):
                if not below <= cuts[h]:
                    cuts[h] |= below
                    changed = True
    ranges = {h: sorted(cuts[h]) for h in hidden}
    ids = {(h, a): n for n, (h, a) in enumerate((h, a) for h in hidden for a in ranges[h][:-1])}
    parent = list(range(len(ids)))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r, i, m in links:
        for a in ranges[r][:-1]:
            if a < m:
                parent[root(ids[(r, a)])] = root(ids[(i, a)])
    roots = {}
    return [[Segment(a, b, roots.setdefault(root(ids[(h, a)]), len(roots)))
             for a, b in zip(ranges[h][:-1], ranges[h][1:])] for h in hidden]
