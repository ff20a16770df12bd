"""The benchmark's CNN probing step: its FLOP count is the analytic one (forward, plus the same again for the
backward to the probes: the zoo weights take no gradient), and it reports the glibc-default peer figure."""

import platform

import pytest
import torch

from fake_zoo import make_zoo
from probegen.bench_train import probing_step
from probegen.nets.small_cnn import feature_sizes, zoo_arch

ARCHS = [zoo_arch("relu"), zoo_arch("tanh")]


def conv_flops_per_input(arch):
    """2 x multiply-adds of one forward of the Small CNN on one 32x32 input (convs, then fc)."""
    sides, c_in, total = feature_sizes(arch), arch["in_channels"], 0
    for c, side in zip(arch["channels"], sides[1:]):
        total += 2 * c * c_in * arch["kernel"] ** 2 * side * side
        c_in = c
    return total + 2 * c_in * arch["num_classes"]


def test_probing_step_counts_forward_and_input_gradient_flops():
    zoo = make_zoo("small_cnn", ARCHS, 8, seed=0)
    probes = torch.rand(4, 1, 32, 32) * 2 - 1
    out = probing_step(zoo, probes, batch_size=8, steps=1, limit=1e11)
    assert out["flops"] == 2 * 8 * 4 * conv_flops_per_input(ARCHS[0])
    assert out["achieved_gflops"] > 0 and 0 < out["fraction_of_matmul_limit"] < 1
    assert ("probing_ms_glibc_default_malloc" in out) == (platform.libc_ver()[0] == "glibc")


def test_generator_step_compares_the_same_map_at_a_quarter_of_the_flops():
    from probegen.bench_train import generator_step
    from probegen.probes.generators import conv_layer_specs

    out = generator_step(num_probes=128, steps=1, limit=1e11)
    side, forward = 1, 0  # spatial size of each layer's input
    for c_in, c_out, k, stride, pad in conv_layer_specs(6, 32, 16, 1):
        forward += 2 * c_in * c_out * k * k * side * side  # every input pixel spreads over k x k outputs
        side = (side - 1) * stride - 2 * pad + k
    # layer by layer: forward, and the backward to both the weights and the latents (2 x forward)
    assert out["layer_by_layer_flops"] == 3 * 128 * forward
    assert out["basis_flops"] < out["layer_by_layer_flops"] / 3  # 33 generator passes instead of 128
    assert out["max_abs_difference"] < 1e-5 and out["speedup"] > 0


@pytest.mark.slow
def test_compiled_step_trains_the_same_model_as_eager():
    # torch.compile (inductor, a C++ compiler on the CPU) on a small ProbeGen: the two paths start from the
    # same initialisation and see the same batches, so their losses may differ only by float rounding.
    from probegen.bench_train import compiled_step
    from probegen.nets.siren import DWSNETS_ARCH

    zoo = make_zoo("siren", [DWSNETS_ARCH], 16, seed=0)
    out = compiled_step(zoo, num_probes=8, batch_size=4, steps=2, compare=4)
    assert out["compile_and_first_step_s"] > 0 and out["eager_step_ms"] > 0 and out["compiled_step_ms"] > 0
    assert out["max_loss_difference_first_steps"] < 1e-4
