"""Dissimilarities, masks and the bootstrap summary."""

import numpy as np
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.patching import Graph, Node, evaluate, kl, loss_increase, squared_error, summarize


def test_kl_matches_the_formula_and_respects_the_mask():
    gen = torch.Generator().manual_seed(0)
    ref, out = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    p, q = ref.softmax(-1), out.softmax(-1)
    per_pos = (p * (p.log() - q.log())).sum(-1)  # (3, 5)
    torch.testing.assert_close(kl()(ref, out), per_pos.mean(1))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1], mask[1, 2:4], mask[2, :] = True, True, True
    expect = torch.stack([per_pos[0, 1], per_pos[1, 2:4].mean(), per_pos[2].mean()])
    torch.testing.assert_close(kl(mask)(ref, out), expect)
    assert torch.equal(kl()(ref, ref), torch.zeros(3))


def test_squared_error_and_loss_increase():
    ref, out = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    assert torch.equal(squared_error()(ref, out), torch.tensor([4.0, 9.0]))
    target = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    # mse: L(out) - L(ref) per pair = [4 - 0, 4 - 1]
    assert torch.equal(loss_increase(target, loss="mse")(ref, out), torch.tensor([4.0, 3.0]))
    logits_ref = torch.tensor([[[5.0, 0.0]]])  # (B=1, T=1, C=2), confident in class 0
    logits_out = torch.tensor([[[0.0, 0.0]]])
    y = torch.tensor([[0]])
    assert loss_increase(y)(logits_ref, logits_out).item() == pytest.approx(
        np.log(2) - np.log1p(np.exp(-5.0)), rel=1e-6)
    with pytest.raises(ProbegenError, match="loss: expected 'ce' or 'mse'"):
        loss_increase(y, loss="hinge")


def test_summarize_point_estimates_and_interval():
    rng = np.random.default_rng(0)
    d0 = rng.uniform(1, 2, size=200)
    dh = 0.25 * d0 + rng.normal(0, 0.01, size=200)
    row = summarize(dh, d0, n_boot=500, seed=0)
    assert row["explained"] == pytest.approx(1 - dh.mean() / d0.mean())
    lo, hi = row["explained_ci"]
    assert lo < row["explained"] < hi and hi - lo < 0.01
    assert summarize(dh, np.zeros(200))["explained"] is None  # nothing to explain


def test_unknown_metric_is_a_clear_error():
    g = Graph(["x"], [Node("out", lambda v: v, {"v": ("x",)})], "out")
    with pytest.raises(ProbegenError, match="metric: expected one of"):
        evaluate(g, ["{}"], torch.zeros(2, 2), torch.ones(2, 2), metric="l1")
