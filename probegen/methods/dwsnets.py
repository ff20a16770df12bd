"""DWSNets (Navon et al. 2023): permutation-equivariant layers between MLP weight spaces, invariant readout.

The network is DWSNets' DWSModelForClassification (probegen/nn/dws.py) with neural-graphs' INR config
`model/dwsnet.yaml`: hidden_dim 32, n_hidden 4 (5 DWS layers), reduction max, 1 FC layer per block, SAB set
layers with 8 heads (1 in the last layer), batch norm, dropout 0, a 1-layer invariant readout. Inputs and
outputs of the probed MLP are fixed, the hidden neurons permute. MLP weight spaces only (the siren family):
convolutional families are refused.

cfg: hidden (32: DWS feature width), layers (5: DWS layers = DWSNets' n_hidden + 1), reduction (max |
mean | sum), set_layer (sab | ds), heads (8), fc_layers (1), out_fc_layers (1), bn (true), dropout (0.0),
init_scale (1.0), standardize (true), augment (false).
"""

from probegen.errors import ProbegenError
from probegen.methods import register
from probegen.nn.equivariant import EquivariantMethod, check_choice
from probegen.nn.dws import DWSNet
from probegen.nn.weight_space import REDUCTIONS


CONV_REASON = "DWSNets layers are defined for MLP weight spaces; its networks have convolutional layers"


@register("dwsnets", "weights")
class DWSNets(EquivariantMethod):
    network_name = "DWSNets"
    # refused by family name (build_method) and, for any other family, from the layouts (check_layouts)
    excludes = {family: CONV_REASON for family in ("small_cnn", "wild_park")}
    defaults = {"hidden": 32, "layers": 5, "reduction": "max", "set_layer": "sab", "heads": 8, "fc_layers": 1,
                "out_fc_layers": 1, "bn": True, "dropout": 0.0, "init_scale": 1.0, "standardize": True,
                "augment": False}

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        check_choice(self.name, cfg, "reduction", REDUCTIONS)
        check_choice(self.name, cfg, "set_layer", ("sab", "ds"))
        if cfg["set_layer"] == "sab" and cfg["hidden"] % cfg["heads"]:
            raise ProbegenError(f"method.{self.name}: hidden ({cfg['hidden']}) must be a multiple of heads "
                                f"({cfg['heads']}) for SAB set layers")
        self.net = DWSNet(self.spaces[0], self.out_dim, hidden=cfg["hidden"], layers=cfg["layers"],
                          reduction=cfg["reduction"], set_layer=cfg["set_layer"], heads=cfg["heads"],
                          fc_layers=cfg["fc_layers"], out_fc_layers=cfg["out_fc_layers"], bn=cfg["bn"],
                          dropout=cfg["dropout"], init_scale=cfg["init_scale"])
        self.stackable = cfg["dropout"] == 0  # vmapped seeds (probegen/training.py) may not draw random numbers

    def check_layouts(self, layouts):
        if any(layer.kind != "linear" for lay in layouts for layer in lay.layers):
            raise ProbegenError(self._refuse(CONV_REASON))

    def predict(self, tensors, space):
        views = [space.to_sets(t.unsqueeze(-1), k) for k, t in enumerate(tensors)]  # (b, *sets, fixed)
        return self.net(views, space)
