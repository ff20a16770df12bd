"""A network's parameters as tensors with permutable axes: what equivariant weight-space networks act on.

From a Layout (probegen/nets/layout.py) with L layers, the 2L tensors in layout order W_0, b_0, W_1, ...,
each with a feature axis last (F = 1 for the raw weights):

    W_l  (B, out, in, *kernel, F)        b_l  (B, out, F)

Neuron groups: g_0 = the network's inputs, g_{l+1} = the outputs of layer l (g_L = the network's outputs);
W_l's neuron axes are (g_{l+1}, g_l), b_l's is (g_{l+1}). The hidden groups g_1 .. g_{L-1} are permutable
(permuting them preserves the function); the inputs g_0 and outputs g_L are fixed (DWSNets, NFN-HNP) or
permutable too (NFN-NP, `permute_io`). A convolution's kernel entries are never permuted.

The **set view** of a tensor puts its permutable axes first, in axis order, and folds everything fixed
(fixed neurons, kernel entries, features) into one feature axis, features fastest:

    natural (B, out, in, kh, kw, F)  ->  set view (B, n_out, n_in, kh * kw * F)     (both groups permutable)
    W_0 with fixed inputs            ->  (B, n_1, n_0 * kh * kw * F)

Every equivariant operation is then one of: pool a tensor over some of its set axes, map features per set
element, broadcast along set axes. Parameter shapes depend only on the `signature` (depth, which axes are
sets, fixed sizes), not on the hidden widths, so one network serves architectures that differ in width.

    space = WeightSpace(layout, permute_io=False)
    views = [space.to_sets(t, k) for k, t in enumerate(tensors)]
    pooled = space.pool(views[2], 2, keep=(1,), reduction="mean")   # W_1 pooled over g_2: (B, n_1, f)
    y = space.broadcast(pooled, (1,), 1)                              # onto b_0's set axes: (B, n_1, f)
    z = space.full(space.broadcast(pooled, (1,), 2), 2)               # onto W_1's: (B, n_2, n_1, f)
"""

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "max")


@dataclass(frozen=True)
class TensorSpec:
    name: str       # "W0", "b0", "W1", ...
    groups: tuple   # the neuron group of each neuron axis: W_l (l + 1, l), b_l (l + 1,)
    kernel: tuple   # W_l's spatial kernel (kh, kw) for a convolution, () otherwise
    sets: tuple     # the permutable groups among `groups`, in axis order
    fixed: int      # entries per set element: the fixed neuron axes' sizes x kernel size


class WeightSpace:
    def __init__(self, layout, permute_io=False):
        L = len(layout.layers)
        self.num_layers = L
        self.permute_io = permute_io
        self.sizes = (layout.layers[0].units_in, *(layer.units_out for layer in layout.layers))  # n_g
        permutable = set(range(1, L)) | ({0, L} if permute_io else set())
        tensors = []
        for l, layer in enumerate(layout.layers):
            for name, groups, kernel in ((f"W{l}", (l + 1, l), layer.kernel), (f"b{l}", (l + 1,), ())):
                sets = tuple(g for g in groups if g in permutable)
                fixed = math.prod(self.sizes[g] for g in groups if g not in permutable) * math.prod(kernel)
                tensors.append(TensorSpec(name, groups, tuple(kernel), sets, fixed))
        self.tensors = tuple(tensors)

    def __len__(self):
        return len(self.tensors)

    def signature(self):
        """What parameter shapes depend on: equal signatures can share one network (widths may differ)."""
        return tuple((t.groups, t.sets, t.kernel, t.fixed) for t in self.tensors)

    # ----------------------------------------------------------------------------------------- views

    def _positions(self, k):
        """Natural axis positions (after the batch axis) of tensor k's set axes and of its fixed axes."""
        t = self.tensors[k]
        n_axes = len(t.groups) + len(t.kernel)
        set_pos = [1 + i for i, g in enumerate(t.groups) if g in t.sets]
        return set_pos, [p for p in range(1, n_axes + 1) if p not in set_pos]

    def to_sets(self, x, k):
        """Natural tensor k (B, *axes, F) -> set view (B, *set sizes, fixed * F)."""
        set_pos, fixed_pos = self._positions(k)
        x = x.permute(0, *set_pos, *fixed_pos, x.dim() - 1)
        return x.reshape(*x.shape[:1 + len(set_pos)], -1)

    def from_sets(self, v, k, shape):
        """Inverse of to_sets; `shape` is the tensor's natural shape without batch and feature axes."""
        set_pos, fixed_pos = self._positions(k)
        sizes = [shape[p - 1] for p in set_pos + fixed_pos]
        x = v.reshape(v.shape[0], *sizes, -1)  # (B, *set sizes, *fixed sizes, F)
        order = set_pos + fixed_pos
        inverse = [0] + [1 + order.index(p) for p in range(1, len(order) + 1)] + [len(order) + 1]
        return x.permute(*inverse)

    def fixed_shape(self, k, shape):
        """Natural broadcast shape (without batch) of a per-fixed-entry vector (fixed,): 1 on set axes."""
        set_pos, _ = self._positions(k)
        return tuple(1 if p + 1 in set_pos else n for p, n in enumerate(shape))

    # ---------------------------------------------------------------------------- pool and broadcast

    def pool(self, v, k, keep, reduction):
        """Set view v of tensor k reduced over its set axes not in `keep` -> (B, *[n_g for g in keep], f)."""
        sets = self.tensors[k].sets
        dims = [1 + i for i, g in enumerate(sets) if g not in keep]
        if dims:
            v = reduce(v, dims, reduction)
        kept = [g for g in sets if g in keep]
        if kept != list(keep):
            v = v.permute(0, *(1 + kept.index(g) for g in keep), v.dim() - 1)
        return v

    def broadcast(self, v, keep, k):
        """v (B, *[n_g for g in keep], f), keep among tensor k's sets -> (B, *[n_g or 1 per set of k], f): a
        view with size 1 on the sets not kept, ready for broadcasting arithmetic (see full)."""
        sets = self.tensors[k].sets
        order = [g for g in sets if g in keep]
        if order != list(keep):
            v = v.permute(0, *(1 + list(keep).index(g) for g in order), v.dim() - 1)
        return v.reshape(v.shape[0], *(self.sizes[g] if g in keep else 1 for g in sets), v.shape[-1])

    def full(self, v, k):
        """A broadcastable set view of tensor k expanded to its full set sizes (a view)."""
        return v.expand(v.shape[0], *(self.sizes[g] for g in self.tensors[k].sets), v.shape[-1])

    def invariant(self, v, k, reduction):
        """Set view of tensor k pooled over all its set axes -> (B, f): what invariant readouts read."""
        return self.pool(v, k, (), reduction)


def reduce(v, dims, reduction):
    if reduction == "mean":
        return v.mean(dims)
    if reduction == "sum":
        return v.sum(dims)
    if reduction == "max":
        return v.amax(dims)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ------------------------------------------------------------------------------ standardisation


class SymmetricStats:
    """Train-set mean and std of each tensor's entries, over models and the tensor's permutable axes, one
    pair per fixed entry (e.g. per input coordinate of W_0, per kernel entry of a convolution). Constant
    along permutable axes, so standardising with them commutes with the symmetry.

    Computed in the io-fixed view (WeightSpace(layout)), whatever the network's own view: fixed neurons
    keep their own statistics."""

    def __init__(self, space):
        self.sums = [torch.zeros(t.fixed, dtype=torch.float64) for t in space.tensors]
        self.squares = [torch.zeros(t.fixed, dtype=torch.float64) for t in space.tensors]
        self.counts = [0] * len(space)

    def add(self, space, tensors):
        """tensors: natural (b, *shape) per tensor (no feature axis), of one architecture."""
        for k, t in enumerate(tensors):
            v = space.to_sets(t.unsqueeze(-1), k).reshape(-1, space.tensors[k].fixed).double()
            self.sums[k] += v.sum(0)
            self.squares[k] += (v * v).sum(0)
            self.counts[k] += v.shape[0]

    def result(self):
        """[(mean (fixed,), std (fixed,))] per tensor, float32; a constant entry gets std 1."""
        out = []
        for total, sq, n in zip(self.sums, self.squares, self.counts):
            mean = total / max(n, 1)
            std = (sq / max(n, 1) - mean * mean).clamp(min=0).sqrt()
            std = torch.where(std > 1e-12, std, torch.ones_like(std))
            out.append((mean.float(), std.float()))
        return out
