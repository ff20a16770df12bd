"""What every method shares: the Method interface, the probing pipeline, reading zoo rows.

    method(weights (B, D), arch_ids (B,)) -> (B, num_classes) logits | (B,) regression values
    method.prepare(zoo, train_idx)          once before training (e.g. train-set statistics); default none
    method.flops_per_model() -> int         forward FLOPs to represent and classify one zoo model
    method.probes() -> (K, *input_shape)    probing methods only
"""

import numpy as np
import torch
from torch import nn

from probegen.errors import ProbegenError
from probegen.flops import count_flops
from probegen.methods.classifier import Classifier
from probegen.nets import forward_zoo, get_family


class Method(nn.Module):
    name = None  # set by @register
    kind = None  # "probe" | "weights", set by @register
    defaults = {"hidden": 256, "layers": 6}  # the cfg keys a method reads, with their defaults
    # Predictions unchanged when a model's hidden units are permuted within its layout's symmetry (tested
    # for every method and family); probing methods are by construction, since the function is the same.
    invariant = True
    # Seeds can train as one vmapped ensemble (probegen/training.py): no randomness or data-dependent control
    # flow inside forward.
    stackable = True
    # Architecture families (probegen/nets) the method is not defined for: {family: why}. Known before any
    # zoo is built, so the pipeline can skip such a pair with a note; build_method refuses it in one line.
    excludes = {}

    @classmethod
    def why_unsupported(cls, family):
        """Why the method cannot run on this family, or "" if it can."""
        return cls.excludes.get(family, "")

    def __init__(self, zoo, cfg):
        super().__init__()
        self.family, self.archs, self.task = zoo.family, zoo.archs, zoo.task
        self.out_dim = int(zoo.num_classes) if zoo.task == "classification" else 1
        self.dim = int(zoo.weights.shape[1])
        # How many zoo models use each arch: FLOPs of a mixed zoo are the average over its models.
        self.arch_counts = np.bincount(zoo.arch_ids, minlength=len(zoo.archs)).tolist()
        self.cfg = dict(cfg)

    def prepare(self, zoo, train_idx):
        """Fit anything that depends on the training set; called once by train() before the first step."""

    def augment(self, weights, arch_ids, generator=None):
        """Train-time weight-space augmentation of a batch (probegen/nn/augment.py); the training loop calls
        it when the method's cfg has `augment: true`."""
        from probegen.nn.augment import augment

        return augment(self.family, self.archs, weights, arch_ids, generator)

    def _output(self, logits):
        return logits.squeeze(-1) if self.task == "regression" else logits  # (B,) | (B, C)

    def _mean_over_archs(self, per_arch):
        counts = np.asarray(self.arch_counts, dtype=np.float64)
        return int(round(float(np.dot(counts, per_arch) / counts.sum())))


class ProbingMethod(Method):
    """r(w) = f_w(p_1..p_K), flattened in probe order -> classifier. Subclasses define probes()."""

    def __init__(self, zoo, cfg, num_probes):
        super().__init__(zoo, cfg)
        if num_probes <= 0:
            raise ProbegenError(f"method {self.name!r}: num_probes must be positive, got {num_probes}")
        fam = get_family(self.family)
        shapes = {tuple(fam.input_shape(a)) for a in self.archs}
        outs = {int(fam.output_dim(a)) for a in self.archs}
        if len(shapes) != 1 or len(outs) != 1:
            raise ProbegenError(f"method {self.name!r}: the zoo's architectures disagree on input shape {shapes} "
                                f"or output size {outs}; probing needs one shared probe space")
        self.input_shape, self.response_dim = shapes.pop(), outs.pop()
        self.num_probes = int(num_probes)
        self.head = Classifier(self.num_probes * self.response_dim, self.out_dim, cfg["hidden"], cfg["layers"])

    def probes(self):
        """(K, *input_shape): the probes every zoo model is run on; each probing method defines them."""
        raise TypeError(f"{type(self).__name__} must define probes()")

    def responses(self, weights, arch_ids):
        """(B, D), (B,) -> (B, K, out): every model of the batch on every probe."""
        # The probed networks run in float32 even under autocast: they are the functions being measured,
        # and bf16 would change them (a SIREN's sin(30 x) amplifies rounding of x 30-fold).
        with torch.autocast(weights.device.type, enabled=False):
            return forward_zoo(self.family, self.archs, arch_ids, weights.float(), self.probes().float())

    def forward(self, weights, arch_ids):
        r = self.responses(weights, arch_ids)  # (B, K, out)
        return self._output(self.head(r.flatten(1)))

    def flops_per_model(self):
        """K forwards of the probed network + the classifier. The probes are shared by all models (and
        fixed at inference), so producing them is not a per-model cost."""
        fam = get_family(self.family)
        per_arch = [_forward_flops(fam, a, self.dim, self.input_shape) for a in self.archs]
        return self.num_probes * self._mean_over_archs(per_arch) + self.head.flops()


def _forward_flops(fam, arch, dim, input_shape):
    """FLOPs (2 x multiply-adds of matmuls / convolutions) of one model on one input, counted from the
    shapes the family's batched forward actually uses."""
    with torch.no_grad():
        return count_flops(lambda: fam.forward(arch, torch.zeros(1, dim), torch.zeros(1, *input_shape)))


def zoo_rows(zoo, idx):
    """Rows idx of the (memory-mapped) weights, in the order given -> float32 tensor (len(idx), D).

    Reads in increasing row order (sequential on disk) and copies only these rows."""
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    out = torch.empty((len(idx), zoo.weights.shape[1]))
    out[torch.from_numpy(order)] = zoo.weights[idx[order]]
    return out


def iter_rows(zoo, idx, chunk_bytes=64 << 20):
    """Chunks of (weights (b, D), arch_ids (b,)) over the rows idx, for one pass of statistics; each
    chunk about chunk_bytes, whatever the (padded) width D."""
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    arch_ids = zoo.arch_ids
    chunk = max(1, chunk_bytes // (4 * zoo.weights.shape[1]))
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        yield zoo_rows(zoo, part), torch.from_numpy(arch_ids[part])


def standardize_stats(chunks, dim):
    """Per-column mean and std (float64 sums) over an iterable of (b, dim) tensors; std 0 -> 1."""
    total, sq, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for x in chunks:
        x = x.double()
        total += x.sum(0)
        sq += (x * x).sum(0)
        n += len(x)
    mean = total / n
    std = (sq / n - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns (e.g. zero padding)
    return mean.float(), std.float()
