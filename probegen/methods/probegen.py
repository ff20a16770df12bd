"""ProbeGen: probe k = G(z_k), a shared deep linear generator G and learned per-probe latents z_k ~ N(0, 1).

cfg: hidden (256), layers (6) for the classifier; latent_dim (32); generator_layers (null = 6 for
1-channel images, 5 for 3-channel ones; ignored for coordinates); generator_width (16).
"""

import torch
from torch import nn

from probegen.methods import register
from probegen.methods.base import ProbingMethod
from probegen.probes.generators import generator_for


@register("probegen", "probe")
class ProbeGen(ProbingMethod):
    defaults = {**ProbingMethod.defaults, "latent_dim": 32, "generator_layers": None, "generator_width": 16}

    def __init__(self, zoo, cfg, num_probes, probe_pool=None):
        super().__init__(zoo, cfg, num_probes)
        self.latents = nn.Parameter(torch.randn(self.num_probes, cfg["latent_dim"]))  # (K, 32)
        self.generator = generator_for(self.input_shape, latent_dim=cfg["latent_dim"],
                                       layers=cfg["generator_layers"], width=cfg["generator_width"])

    def probes(self):
        return self.generator(self.latents)  # (K, *input_shape)
