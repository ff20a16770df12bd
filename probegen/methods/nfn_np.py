"""NFN-NP (Zhou et al. 2023): neural functional with neuron-permutation symmetry, IO positional encoding.

NP layers (probegen/nn/nfn.py: NFLinear on WeightSpace(permute_io=True)) treat every neuron group as a
set, the network's inputs and outputs included; the IO-sinusoidal encoding then tells inputs and outputs
apart. Defaults are neural-graphs' INR config `model/nfn.yaml`: NP, channels [512, 512, 512], Gaussian
Fourier input encoding (256 frequencies), IO encoding (6 bands, max frequency 10, layer code on), mean
pooling, head 1000-1000 with dropout 0.5. MLP and CNN zoos of one architecture (channels permute, kernel
entries are features); residual connections (Wild Park) are refused.

One deliberate change: the Fourier scale is 1, not 10. neural-graphs feeds raw weights (std about
0.02-0.1 in INR zoos) to a scale-10 encoding, i.e. frequencies of about 0.2-1 per standard deviation; the
inputs here are standardised (std 1), where scale 10 would mean 10 per standard deviation and turn the
encoding into high-frequency noise (separable fake INR zoo, 30 epochs: test accuracy 0.53 with scale 10,
1.0 with scale 1; chance 0.33).

cfg: hidden (512: channels per NP layer), layers (3), final_channels (null = hidden: the last layer's),
fourier (true), fourier_size (256), fourier_scale (1.0), io_encoding (true), io_bands (6),
io_max_freq (10.0), head_hidden (1000), head_dropout (0.5), standardize (true), augment (false).
"""

from probegen.methods import register
from probegen.nn.equivariant import NFNMethod


@register("nfn_np", "weights")
class NFNNP(NFNMethod):
    permute_io = True
    defaults = {"hidden": 512, "layers": 3, "final_channels": None, "fourier": True, "fourier_size": 256,
                "fourier_scale": 1.0, "io_encoding": True, "io_bands": 6, "io_max_freq": 10.0, "head_hidden": 1000,
                "head_dropout": 0.5, "standardize": True, "augment": False}
