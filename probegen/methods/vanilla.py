"""Vanilla probing: the K probes are free parameters (images through tanh, coordinates unbounded).

cfg: hidden (256), layers (6).
"""

from probegen.methods import register
from probegen.methods.base import ProbingMethod
from probegen.probes.generators import FreeProbes


@register("vanilla", "probe")
class Vanilla(ProbingMethod):
    def __init__(self, zoo, cfg, num_probes, probe_pool=None):
        super().__init__(zoo, cfg, num_probes)
        self.free = FreeProbes(self.num_probes, self.input_shape, bounded=len(self.input_shape) == 3)

    def probes(self):
        return self.free()  # (K, *input_shape)
