"""Neural functionals (Zhou et al. 2023, AllanYangZhou/nfn): equivariant linear layers of a weight space.

NFLinear is the complete equivariant linear layer of the space's symmetry (the space is in set view:
probegen/nn/weight_space.py). NP = every neuron group permutable, inputs and outputs included
(WeightSpace(permute_io=True); NFN's NPLinear); HNP = only the hidden groups (NFN's HNPLinear, where the
input and output neurons are folded into features). For each output tensor Y, one linear map per index
set K of Y's set axes, reading every input tensor X that has all of K, mean-pooled over X's other axes:

    K = ()        every tensor pooled over all its sets              -> broadcast over all of Y
    K = (g,)      every tensor with group g, pooled to (B, n_g, f)   -> broadcast over Y's other axis
    K = (g, h)    Y itself entry-wise (only a weight has two sets)

This is what NFN's per-layer cases (first / middle / last layer, row and column broadcasts, the
`rc_inp` vector) enumerate by hand; tests/nn/test_nfn.py checks that it spans exactly the equivariant
linear maps of a small space (against orbit counting) for both symmetries.

Around the layers (NFN's InvariantNFN, neural-graphs' INR variant):
    GaussianFourier   x -> [sin, cos](2 pi x B), B ~ N(0, scale^2) fixed (in 1, out 2 x size features)
    IOEncoding        NFN's IOSinusoidalEncoding: a sinusoidal code of the layer index on every entry,
                      plus the input index on W_0 and the output index on W_{L-1} and b_{L-1}
    ReLU after every layer (TupleOp), mean pooling over set axes, an MLP head (neural-graphs' form:
    dropout before each linear).
"""

import math

import torch
from torch import nn


class NFLinear(nn.Module):
    """Set views with c_in features per fixed entry -> set views with c_out."""

    def __init__(self, space, c_in, c_out):
        super().__init__()
        self.terms = []  # (y, K, [x readers]) with the linear map in self.maps in the same order
        maps = []
        for y, ty in enumerate(space.tensors):
            keys = [()] + [(g,) for g in ty.sets] + ([ty.sets] if len(ty.sets) == 2 else [])
            group = []
            for K in keys:
                readers = [y] if len(K) == 2 else [x for x, tx in enumerate(space.tensors) if set(K) <= set(tx.sets)]
                f_in = sum(space.tensors[x].fixed for x in readers) * c_in
                maps.append(nn.Linear(f_in, ty.fixed * c_out))
                group.append(maps[-1])
                self.terms.append((y, K, readers))
            _init_nfn(group)
        self.maps = nn.ModuleList(maps)
        self.n = len(space)

    def forward(self, views, space):
        pooled = {}  # (x, K) -> x mean-pooled onto K: shared by every output that reads it

        def read(x, K):
            if (x, K) not in pooled:
                pooled[(x, K)] = views[x] if len(K) == 2 else space.pool(views[x], x, K, "mean")
            return pooled[(x, K)]

        out = [None] * self.n
        for (y, K, readers), linear in self.ordered:
            z = linear(torch.cat([read(x, K) for x in readers], -1))  # (B, *K sizes, fixed_y * c_out)
            z = space.broadcast(z, K, y)  # size 1 on Y's other sets: added by broadcasting
            out[y] = z if out[y] is None else out[y] + z
        return [space.full(o, y) for y, o in enumerate(out)]

    @property
    def ordered(self):
        """(term, map) with each output's full-size term first, so the others add by broadcasting."""
        return sorted(zip(self.terms, self.maps), key=lambda tm: (tm[0][0], -len(tm[0][1])))


def _init_nfn(linears):
    """NFN's set_init_: every map feeding one output tensor U(-1/sqrt(total fan-in), +) incl. biases."""
    bound = math.sqrt(1 / sum(m.in_features for m in linears))
    for m in linears:
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.uniform_(m.bias, -bound, bound)


class GaussianFourier(nn.Module):
    """x (..., c) -> (..., 2 size): sin and cos of 2 pi x B, B (c, size) ~ N(0, scale^2) fixed at init."""

    def __init__(self, c_in, size, scale):
        super().__init__()
        self.register_buffer("B", torch.randn(c_in, size) * scale)
        self.out_features = 2 * size

    def forward(self, x):
        x = 2 * math.pi * (x @ self.B)
        return torch.cat([torch.sin(x), torch.cos(x)], -1)


def fourier_code(x, max_freq, bands):
    """NFN's fourier_encode: x (n,) -> (n, 2 bands + 1) = [sin, cos](pi x s) for s = linspace(1, max_freq/2), x."""
    scales = torch.linspace(1.0, max_freq / 2, bands, dtype=x.dtype, device=x.device)
    xs = x[:, None] * scales * math.pi
    return torch.cat([xs.sin(), xs.cos(), x[:, None]], -1)


class IOEncoding(nn.Module):
    """Appends 2 bands + 1 features to every entry of natural tensors (B, *axes, F): the layer code
    (layer index in linspace(-1, 1, L)), plus the input-neuron code on W_0 (along its input axis) and the
    output-neuron code on W_{L-1} and b_{L-1} (along the output axis). Kernel entries share their entry's code.
    (NFN's conv variant reuses the input code for the output by mistake; here each gets its own.)"""

    def __init__(self, max_freq, bands):
        super().__init__()
        self.max_freq, self.bands = max_freq, bands
        self.out_extra = 2 * bands + 1

    def forward(self, tensors, space):
        L, x = space.num_layers, tensors[0]
        code = lambda n: fourier_code(torch.linspace(-1.0, 1.0, n, dtype=x.dtype, device=x.device),  # noqa: E731
                                      self.max_freq, self.bands)
        layer_code, in_code, out_code = code(L), code(space.sizes[0]), code(space.sizes[-1])  # (n, d)
        out = []
        for k, t in enumerate(tensors):
            l, is_weight = k // 2, k % 2 == 0  # tensors are W_0, b_0, W_1, ...
            enc = layer_code[l].expand(*t.shape[:-1], -1)  # (B, *axes, d)
            if is_weight and l == 0:
                enc = enc + _along(in_code, t.dim(), 2)
            if l == L - 1:
                enc = enc + _along(out_code, t.dim(), 1)
            out.append(torch.cat([t, enc], -1))
        return out


def _along(code, dim, axis):
    """code (n, d) shaped to broadcast along natural axis `axis` of a (B, *axes, F) tensor of `dim` dims."""
    shape = [1] * dim
    shape[axis], shape[-1] = code.shape
    return code.view(shape)


class NFN(nn.Module):
    """InvariantNFN: [GaussianFourier] [IOEncoding] (NFLinear, ReLU) x len(channels), mean pooling, MLP head.
    Natural tensors (B, *axes, 1) in -> (B, out_dim)."""

    def __init__(self, space, out_dim, *, channels, fourier_size=0, fourier_scale=10.0, io_bands=0,
                 io_max_freq=10.0, head_hidden=1000, head_dropout=0.0):
        super().__init__()
        c = 1
        self.fourier = GaussianFourier(1, fourier_size, fourier_scale) if fourier_size else None
        c = self.fourier.out_features if self.fourier else c
        self.io = IOEncoding(io_max_freq, io_bands) if io_bands else None
        c = c + self.io.out_extra if self.io else c
        widths = [c, *channels]
        self.layers = nn.ModuleList(NFLinear(space, a, b) for a, b in zip(widths[:-1], widths[1:]))
        pooled = sum(t.fixed for t in space.tensors) * widths[-1]
        dims = [pooled, head_hidden, head_hidden, out_dim]
        head = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            head += [nn.Dropout(head_dropout), nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
        self.head = nn.Sequential(*head)

    def forward(self, tensors, space):
        if self.fourier is not None:
            tensors = [self.fourier(t) for t in tensors]
        if self.io is not None:
            tensors = self.io(tensors, space)
        views = [space.to_sets(t, k) for k, t in enumerate(tensors)]
        for layer in self.layers:
            views = [torch.relu(v) for v in layer(views, space)]
        pooled = [space.invariant(v, k, "mean") for k, v in enumerate(views)]  # (B, fixed * c)
        return self.head(torch.cat(pooled, -1))
