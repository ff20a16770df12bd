"""StatNN: 7 statistics of every weight and bias tensor [mean, var, q0, q.25, q.5, q.75, q1], then an MLP.

Tensors follow the architecture's declared layout (weight then bias per layer); architectures with fewer tensors are zero-padded to the
largest count (as Neural Graphs pads). var is unbiased (torch.var, as Neural Graphs), 0 for one-element
tensors. Features are standardised with train-set statistics. Computed for the whole batch at once: one
vectorised call per tensor and architecture present, never per model.

cfg: hidden (256), layers (6), standardize (true), augment (false: train-time weight-space augmentation).
"""

import torch
import torch.nn.functional as F

from probegen.methods import register
from probegen.methods.base import Method, iter_rows, standardize_stats
from probegen.methods.classifier import Classifier
from probegen.nets import get_layout, per_layer

NUM_STATS = 7
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@register("statnn", "weights")
class StatNN(Method):
    defaults = {**Method.defaults, "standardize": True, "augment": False}

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        self.num_features = NUM_STATS * max(len(get_layout(self.family, a).param_shapes) for a in self.archs)
        self.register_buffer("mean", torch.zeros(self.num_features))
        self.register_buffer("std", torch.ones(self.num_features))
        self.head = Classifier(self.num_features, self.out_dim, cfg["hidden"], cfg["layers"])

    def statistics(self, weights, arch_ids):
        """(B, D), (B,) -> (B, 7 * max_tensors) raw statistics, tensor by tensor; zeros after the last tensor
        of an architecture with fewer."""
        q = torch.tensor(QUANTILES, dtype=weights.dtype, device=weights.device)
        groups = per_layer(self.family, self.archs, weights, arch_ids)
        feats = [torch.cat([_tensor_stats(t.flatten(1), q) for W, b in layers for t in (W, b)], 1)
                 for _, _, _, layers in groups]  # (b, 7 * tensors) per architecture
        feats = [F.pad(f, (0, self.num_features - f.shape[1])) for f in feats]
        if len(groups) == 1:
            return feats[0]
        out = weights.new_zeros(len(weights), self.num_features)
        for (_, rows, _, _), f in zip(groups, feats):
            out[rows] = f
        return out

    def prepare(self, zoo, train_idx):
        if self.cfg["standardize"]:
            chunks = (self.statistics(w, a) for w, a in iter_rows(zoo, train_idx))
            mean, std = standardize_stats(chunks, self.num_features)
            self.mean.copy_(mean)
            self.std.copy_(std)

    def forward(self, weights, arch_ids):
        x = (self.statistics(weights, arch_ids) - self.mean) / self.std  # (B, F)
        return self._output(self.head(x))

    def flops_per_model(self):
        return self.head.flops()


def _tensor_stats(t, q):
    """t (b, size) -> (b, 7): mean, var, quantiles 0 / .25 / .5 / .75 / 1 (linear interpolation, as
    torch.quantile; computed from one sort, which vmap batches, where torch.quantile has no batching rule)."""
    var = t.var(1, correction=1) if t.shape[1] > 1 else torch.zeros_like(t[:, 0])
    ordered = t.sort(1).values  # (b, size)
    pos = q * (t.shape[1] - 1)  # (5,) fractional ranks
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(t.dtype)
    quant = ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * frac  # (b, 5)
    return torch.cat([t.mean(1, keepdim=True), var.unsqueeze(1), quant], 1)
