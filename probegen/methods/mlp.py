"""MLP on the flattened weights, each coordinate standardised with train-set statistics (computed once).

cfg: hidden (256), layers (6), standardize (true), augment (false: train-time weight-space augmentation).
"""

import torch

from probegen.methods import register
from probegen.methods.base import Method, iter_rows, standardize_stats
from probegen.methods.classifier import Classifier


@register("mlp", "weights")
class MLP(Method):
    defaults = {**Method.defaults, "standardize": True, "augment": False}
    invariant = False  # reads every weight at its position: a permuted network is a different input

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))
        self.head = Classifier(self.dim, self.out_dim, cfg["hidden"], cfg["layers"])

    def prepare(self, zoo, train_idx):
        if self.cfg["standardize"]:
            mean, std = standardize_stats((w for w, _ in iter_rows(zoo, train_idx)), self.dim)
            self.mean.copy_(mean)
            self.std.copy_(std)

    def forward(self, weights, arch_ids):
        x = (weights - self.mean) / self.std  # (B, D)
        return self._output(self.head(x))

    def flops_per_model(self):
        return self.head.flops()
