import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from probegen.metrics import _inversions, accuracy, count_params, kendall_tau


def _scipy(x, y):
    with warnings.catch_warnings():  # scipy warns on the degenerate cases we compare on purpose
        warnings.simplefilter("ignore")
        return scipy.stats.kendalltau(x, y).statistic


@pytest.mark.parametrize("n", [3, 10, 257, 4000])
def test_kendall_tau_equals_scipy_on_random_data(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    assert kendall_tau(x, y) == _scipy(x, y)  # bit for bit: the same counts, the same expression


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 600))
    x = rng.integers(0, 6, n).astype(float)  # heavy ties in x, in y, and in both
    y = np.round(x + rng.normal(size=n))
    assert kendall_tau(x, y) == _scipy(x, y)
    assert kendall_tau(torch.tensor(x), torch.tensor(y)) == _scipy(x, y)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 64, 100])
def test_inversions_against_counting_every_pair(n):
    rng = np.random.default_rng(n)
    for high in (2, n):  # many ties, few ties
        a = rng.integers(0, high, n)
        assert _inversions(a) == sum(int(a[i] > a[j]) for i in range(n) for j in range(i + 1, n))
    assert _inversions(np.arange(n)[::-1].copy()) == n * (n - 1) // 2


def test_kendall_tau_small_and_degenerate():
    assert kendall_tau([1.0, 2.0], [3.0, 5.0]) == 1.0
    assert kendall_tau([1.0, 2.0], [5.0, 3.0]) == -1.0
    assert kendall_tau([3, 2, 1], [1, 2, 3]) == pytest.approx(_scipy([3, 2, 1], [1, 2, 3]))
    for x, y in (([1.0, 1.0], [1.0, 2.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]), ([1.0], [2.0])):
        assert math.isnan(kendall_tau(x, y)) and math.isnan(_scipy(x, y))
    assert math.isnan(kendall_tau([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))


def test_kendall_tau_is_symmetric_and_sign_flips():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert kendall_tau(x, y) == pytest.approx(kendall_tau(y, x))
    assert kendall_tau(x, -y) == pytest.approx(-kendall_tau(x, y))


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5
    assert accuracy(logits, torch.tensor([0, 1, 0, 1])) == 1.0


def test_count_params_counts_only_trainable():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_params(m) == 3 * 4 + 4 + 4 * 2 + 2
    m[0].weight.requires_grad_(False)
    assert count_params(m) == 4 + 4 * 2 + 2
