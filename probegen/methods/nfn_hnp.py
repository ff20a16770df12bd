"""NFN-HNP (Zhou et al. 2023): neural functional with hidden-neuron-permutation symmetry.

HNP layers (probegen/nn/nfn.py: NFLinear on WeightSpace(permute_io=False)) permute only the hidden neurons;
the network's input and output neurons are fixed and folded into features, so no positional encoding is
needed. Defaults are NFN's CIFAR10-GS config (`predict_gen_configs/nfnet/hnp_inv.yaml`): HNP invariant,
channels [16, 16, 5], no input encoding, mean pooling, head 1000-1000 without dropout. MLP and CNN zoos of
one architecture (channels permute, kernel entries are features); residual connections are refused.

cfg: as nfn_np (probegen/methods/nfn_np.py; both are probegen.nn.equivariant.NFNMethod) with these defaults: hidden 16, layers 3, final_channels 5,
fourier false, io_encoding false, head_dropout 0.0.
"""

from probegen.methods import register
from probegen.nn.equivariant import NFNMethod


@register("nfn_hnp", "weights")
class NFNHNP(NFNMethod):
    permute_io = False
    defaults = {"hidden": 16, "layers": 3, "final_channels": 5, "fourier": False, "fourier_size": 256,
                "fourier_scale": 1.0, "io_encoding": False, "io_bands": 6, "io_max_freq": 10.0, "head_hidden": 1000,
                "head_dropout": 0.0, "standardize": True, "augment": False}
