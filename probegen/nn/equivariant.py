"""What the equivariant weight-space methods (dwsnets, nfn_np, nfn_hnp) share: EquivariantMethod, and
NFNMethod for the two NFNs. Here, with the layers, because every weights@ stage depends on probegen/nn.

    weights (B, D), arch_ids (B,) -> per-layer tensors from the layout (Layout.split of the whole batch when
    every architecture has the same shapes, else probegen.nets.per_layer), grouped by parameter shapes
    -> standardised with symmetric train-set statistics -> the method's network on each group (one call
    per shape group, never per model) -> (B, out_dim)

Architectures with identical parameter shapes (the Small CNN Zoo's relu and tanh networks) are one group:
the layers see only weights. Architectures that differ only in hidden widths share the network (its
parameters do not depend on widths) but run as separate groups. Architectures that differ in depth,
kernel sizes, or input/output sizes, or that have residual connections (a residual ties channels of two
layers, a different symmetry), are refused in __init__ with one line naming method, family and why.

Standardisation (cfg `standardize`): per tensor, mean and std over the training models and the tensor's
permutable axes, one pair per fixed entry (probegen/nn/weight_space.py: SymmetricStats). DWSNets' own
statistics are per entry, which is not exactly invariant; these are.
"""

import torch

from probegen.errors import ProbegenError
from probegen.flops import count_flops
from probegen.methods.base import Method, iter_rows
from probegen.nets import get_layout, per_layer
from probegen.nn.nfn import NFN
from probegen.nn.weight_space import SymmetricStats, WeightSpace


class EquivariantMethod(Method):
    permute_io = False  # NFN-NP: the network's input and output neurons are permutable too
    network_name = None  # "DWSNets" | "NFN", for error messages

    def __init__(self, zoo, cfg):
        super().__init__(zoo, cfg)
        self.layouts = layouts = [get_layout(self.family, a) for a in self.archs]
        self.check_layouts(layouts)
        if any(layer.residual >= 0 for lay in layouts for layer in lay.layers):
            raise ProbegenError(self._refuse(f"{self.network_name} needs one fixed architecture without residual "
                                             "connections; this zoo's networks have residual connections"))
        self.spaces = [WeightSpace(lay, permute_io=self.permute_io) for lay in layouts]
        self.stat_spaces = [WeightSpace(lay) for lay in layouts]
        if len({s.signature() for s in self.spaces}) > 1:
            raise ProbegenError(self._refuse(f"{self.network_name} needs one fixed architecture without residual "
                                             f"connections; the zoo's {len(layouts)} architectures differ in "
                                             "depth, kernel sizes or input/output sizes"))
        for k, t in enumerate(self.stat_spaces[0].tensors):
            self.register_buffer(f"mean_{k}", torch.zeros(t.fixed))
            self.register_buffer(f"std_{k}", torch.ones(t.fixed))
        shapes = [tuple(layer.weight for layer in lay.layers) for lay in layouts]
        self.representative = [shapes.index(s) for s in shapes]  # arch -> first arch of the same shapes

    def _refuse(self, why):
        # the same line build_method writes for a family refused by name (Method.excludes)
        return f"method {self.name!r}: cannot run on the {self.family} family ({why})"

    def check_layouts(self, layouts):
        """Raise ProbegenError (self._refuse) when the method cannot represent these architectures."""

    def predict(self, tensors, space):
        """Standardised natural tensors [(b, *shape)] per tensor of one shape group -> (b, out_dim)."""
        raise TypeError(f"{type(self).__name__} must define predict()")

    # ------------------------------------------------------------------------------------ batches

    def groups(self, weights, arch_ids):
        """[(rows (b,) or None = the whole batch in order, representative arch, [tensors (b, *shape)] in
        order W_0, b_0, W_1, ...)], one entry per shape group present."""
        if len(set(self.representative)) == 1:  # one shape group: no data-dependent branch (vmap needs none)
            return [(None, 0, [t for W, b in self.layouts[0].split(weights) for t in (W, b)])]
        merged = {}
        for a, rows, _, layers in per_layer(self.family, self.archs, weights, arch_ids):
            merged.setdefault(self.representative[a], []).append((rows, [t for W, b in layers for t in (W, b)]))
        return [(torch.cat([r for r, _ in parts]), rep, [torch.cat(ts) for ts in zip(*(t for _, t in parts))])
                for rep, parts in merged.items()]

    def standardized(self, tensors, rep):
        if not self.cfg["standardize"]:
            return tensors
        space, out = self.stat_spaces[rep], []
        for k, t in enumerate(tensors):
            shape = space.fixed_shape(k, t.shape[1:])
            out.append((t - getattr(self, f"mean_{k}").view(shape)) / getattr(self, f"std_{k}").view(shape))
        return out

    def forward(self, weights, arch_ids):
        groups = self.groups(weights, arch_ids)
        if groups[0][0] is None:
            _, rep, tensors = groups[0]
            return self._output(self.predict(self.standardized(tensors, rep), self.spaces[rep]))
        out = None
        for rows, rep, tensors in groups:
            pred = self.predict(self.standardized(tensors, rep), self.spaces[rep])  # (b, out_dim)
            if out is None:  # the predictions' dtype: bf16 under CUDA autocast
                out = pred.new_zeros(len(weights), pred.shape[-1])
            out[rows] = pred
        return self._output(out)

    def prepare(self, zoo, train_idx):
        if not self.cfg["standardize"]:
            return
        stats = SymmetricStats(self.stat_spaces[0])
        for w, a in iter_rows(zoo, train_idx):
            for _, rep, tensors in self.groups(w, a):
                stats.add(self.stat_spaces[rep], tensors)
        for k, (mean, std) in enumerate(stats.result()):
            getattr(self, f"mean_{k}").copy_(mean)
            getattr(self, f"std_{k}").copy_(std)

    def flops_per_model(self):
        """FLOPs of one forward (eval mode) of one model per architecture, averaged over the zoo's models;
        counted (probegen.flops) on the shapes the forward uses (matmuls, attention, linears)."""
        was_training, device = self.training, self.mean_0.device
        self.eval()
        per_arch = []
        for a in range(len(self.archs)):
            with torch.no_grad():
                per_arch.append(count_flops(lambda: self(torch.zeros(1, self.dim, device=device),
                                                         torch.full((1,), a, device=device))))
        self.train(was_training)
        return self._mean_over_archs(per_arch)


def check_choice(method, cfg, key, choices):
    if cfg[key] not in choices:
        raise ProbegenError(f"method.{method}: {key}: expected one of {list(choices)}, got {cfg[key]!r}")


class NFNMethod(EquivariantMethod):
    """The NFN plumbing shared by nfn_np and nfn_hnp; they differ in symmetry and defaults."""
    network_name = "NFN"
    # refused by family name (build_method) and, for any other family, from the layouts (EquivariantMethod)
    excludes = {"wild_park": "NFN needs one fixed architecture without residual connections; Wild Park networks "
                             "have residual connections and mixed architectures"}

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        final = cfg["final_channels"] if cfg["final_channels"] is not None else cfg["hidden"]
        if isinstance(final, bool) or not isinstance(final, int) or final < 1:
            raise ProbegenError(f"method.{self.name}: final_channels: expected null or a positive integer, "
                                f"got {cfg['final_channels']!r}")
        channels = [cfg["hidden"]] * (cfg["layers"] - 1) + [final]
        self.net = NFN(self.spaces[0], self.out_dim, channels=channels,
                       fourier_size=cfg["fourier_size"] if cfg["fourier"] else 0, fourier_scale=cfg["fourier_scale"],
                       io_bands=cfg["io_bands"] if cfg["io_encoding"] else 0, io_max_freq=cfg["io_max_freq"],
                       head_hidden=cfg["head_hidden"], head_dropout=cfg["head_dropout"])
        self.stackable = cfg["head_dropout"] == 0  # vmapped seeds (probegen/training.py) may not draw random numbers

    def predict(self, tensors, space):
        return self.net([t.unsqueeze(-1) for t in tensors], space)  # natural (b, *shape, 1)
