"""Every registered method x every architecture family: a random function-preserving permutation of the
hidden units (checked first: the batched forward gives the same outputs) leaves the prediction unchanged in
eval mode, for methods declared invariant; a method that is not (mlp) is shown to change."""

import numpy as np
import pytest
import torch

from fake_zoo import make_zoo
from probegen.errors import ProbegenError
from probegen.methods import METHODS, build_method
from probegen.nets import forward_zoo, get_family
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch
from probegen.patching.probers import random_permutation
from probegen.probes.dead_leaves import render

POOL = render(8, 32, seed=0)
SMALL = {"hidden": 16, "layers": 3}


def wild_park_arch(channels, residual, acts):
    n = len(channels)
    return {"in_channels": 3, "channels": channels, "kernel_size": [3, 5, 3, 3][:n], "stride": [1] * n,
            "padding": [1, 2, 1, 1][:n], "residual": residual, "activation": acts, "num_classes": 10}


# (task, archs, weight std): SIREN weights at the scale DWSNets initialises them (sin(30 x) turns larger
# random weights into noise, where float rounding alone changes the outputs).
FAMILIES = {
    "siren": ("classification", [DWSNETS_ARCH], 0.05),
    "small_cnn": ("regression", [zoo_arch("relu"), zoo_arch("tanh")], 0.5),
    # residuals into narrower and wider layers (ties of different widths), and a plain net of another depth
    "wild_park": ("regression", [wild_park_arch([8, 4, 6, 8], [-1, -1, 0, 1], ["relu", "tanh", "gelu", "relu"]),
                                 wild_park_arch([4, 8, 4], [-1, -1, 0], ["sigmoid"] * 3)], 0.5),
}


def zoo_and_permuted(family, n=6):
    task, archs, std = FAMILIES[family]
    zoo = make_zoo(family, archs, n, task=task, num_classes=10, seed=1, std=std)
    w, ids = zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())
    permuted = random_permutation(family, archs, w, zoo.arch_ids, seed=2)
    x = torch.randn(5, *get_family(family).input_shape(archs[0]), generator=torch.Generator().manual_seed(3))
    assert (permuted - w).abs().max() > std / 10  # the weights did move
    torch.testing.assert_close(forward_zoo(family, archs, ids, permuted, x), forward_zoo(family, archs, ids, w, x),
                               rtol=1e-5, atol=1e-5)  # and the functions did not
    return zoo, w, permuted, ids


def build(name, zoo):
    method = build_method(name, zoo, SMALL, num_probes=4, probe_pool=POOL, seed=0)
    method.prepare(zoo, np.arange(len(zoo)))
    return method.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_prediction_is_invariant_to_hidden_unit_permutations(name, family):
    zoo, w, permuted, ids = zoo_and_permuted(family)
    try:
        method = build(name, zoo)
    except ProbegenError as err:  # a method that does not support this family says so in one line
        assert name in str(err) and family in str(err) and "\n" not in str(err)
        pytest.skip(f"{name} does not run on {family}: {err}")
    with torch.no_grad():
        before, after = method(w, ids), method(permuted, ids)
    if METHODS[name].invariant:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    else:  # not meant to be invariant: the same function, permuted, is a different input
        assert (after - before).abs().max() > 1e-4, f"{name} is declared not invariant but did not change"


def test_invariance_table_names_the_methods_that_are_not_invariant():
    assert sorted(n for n, m in METHODS.items() if not m.invariant) == ["mlp"]
