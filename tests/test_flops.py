"""probegen.flops against torch's FlopCounterMode, the counter it stands in for: the same total on every
method's training step (forward and backward) on every family, and on the operators it must count."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from methods.test_invariance import FAMILIES, build, zoo_and_permuted
from probegen.flops import count_flops
from probegen.methods import METHODS


def torch_count(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_counts_matmuls_and_convolutions_as_torch_does():
    x, w = torch.randn(4, 3, 9, 9, requires_grad=True), torch.randn(8, 3, 3, 3)
    q = torch.randn(2, 4, 7, 16)
    cases = {"linear": lambda: F.linear(torch.randn(5, 6), torch.randn(7, 6), torch.randn(7)),
             "bmm": lambda: torch.randn(3, 4, 5) @ torch.randn(3, 5, 6),
             "einsum": lambda: torch.einsum("bij,bjk->bik", torch.randn(3, 4, 5), torch.randn(3, 5, 6)),
             "baddbmm": lambda: torch.baddbmm(torch.randn(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)),
             "conv + backward": lambda: F.conv2d(x, w, padding=1).sum().backward()}
    for name, fn in cases.items():
        ours = count_flops(fn)
        assert ours == torch_count(fn) > 0, name
    # CPU attention is a kernel neither table knows (ng_t adds its scores by hand): both count 0
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 0
    assert torch_count(lambda: F.scaled_dot_product_attention(q, q, q)) == 0
    assert count_flops(lambda: torch.randn(5, 5).sin() + 1) == 0  # elementwise work is not counted


# Every (method, family) pair a method trains on; the ones it declares unsupported (DWSNets on convolutional
# families, NFNs on Wild Park) refuse before training, as tests/methods/test_dwsnets.py and test_nfn.py check.
SUPPORTED = [(name, family) for name in sorted(METHODS) for family in sorted(FAMILIES)
             if not METHODS[name].why_unsupported(family)]


@pytest.mark.parametrize("name,family", SUPPORTED)
def test_a_training_step_counts_as_with_flop_counter_mode(name, family):
    zoo, w, _, ids = zoo_and_permuted(family)
    method = build(name, zoo).train()

    def step():
        method.zero_grad()
        method(w, ids).float().square().mean().backward()

    ours = count_flops(step)
    assert ours == torch_count(step) > 0
    assert method.flops_per_model() > 0


def test_counting_does_not_import_torch_dynamo():
    code = ("import sys, torch; from probegen.flops import count_flops; "
            "n = count_flops(lambda: torch.ones(4, 4) @ torch.ones(4, 4)); "
            "print(n, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["128", "False"]
