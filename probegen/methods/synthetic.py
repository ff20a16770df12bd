"""Synthetic probes, fixed (not trained); only the classifier learns.

Coordinates (INRs): K points uniform in [-1, 1]^d, drawn from the seeded generator.
Images: the first K images of the Dead-Leaves pool (RGB (P, 3, R, R) in [0, 1]) in the zoo's input range:
luminance scaled to [-1, 1] for 1 channel, CIFAR-10 normalised RGB for 3.

cfg: hidden (256), layers (6).
"""

import numpy as np
import torch

from probegen.errors import ProbegenError
from probegen.methods import register
from probegen.methods.base import ProbingMethod
from probegen.probes.dead_leaves import to_input_range
from probegen.probes.generators import FixedProbes


@register("synthetic", "probe")
class Synthetic(ProbingMethod):
    def __init__(self, zoo, cfg, num_probes, probe_pool=None):
        super().__init__(zoo, cfg, num_probes)
        K = self.num_probes
        if len(self.input_shape) == 1:
            probes = torch.rand(K, *self.input_shape) * 2 - 1  # (K, d) uniform in [-1, 1]
        else:
            if probe_pool is None:
                raise ProbegenError("method 'synthetic': the Dead-Leaves pool (data/probes/dead_leaves.npy) is "
                                    "missing; run the render_probes stage first")
            if len(probe_pool) < K:
                raise ProbegenError(f"method 'synthetic': needs {K} Dead-Leaves images, the pool has "
                                    f"{len(probe_pool)}; raise dead_leaves.pool_size to at least num_probes")
            pool = torch.from_numpy(np.array(probe_pool[:K], dtype=np.float32))  # a copy: the pool may be a memmap
            probes = to_input_range(pool, self.input_shape)
        self.fixed = FixedProbes(probes)

    def probes(self):
        return self.fixed()  # (K, *input_shape), a buffer
