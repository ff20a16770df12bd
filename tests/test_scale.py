import numpy as np
import torch

from probegen.nets import forward_zoo, num_params
from probegen.scale import synthetic_zoo, wild_park_archs


def test_wild_park_archs_follow_the_sampler_ranges():
    archs = wild_park_archs(300)
    assert {len(a["channels"]) for a in archs} == {2, 3, 4, 5}
    assert {c for a in archs for c in a["channels"]} == {4, 8, 16, 32}
    assert all(p == k // 2 for a in archs for k, p in zip(a["kernel_size"], a["padding"]))
    assert any(r >= 0 for a in archs for r in a["residual"])  # some residual connections


def test_synthetic_zoo_is_ragged_and_runs_batched():
    archs = wild_park_archs(5, seed=1)
    arch_ids = np.arange(40) % 5
    zoo = synthetic_zoo("wild_park", archs, arch_ids, "regression")
    own = np.array([num_params("wild_park", a) for a in archs])[arch_ids]
    np.testing.assert_array_equal(zoo.weights.sizes.numpy(), own)  # each model its own size, no padding
    assert zoo.weights.nbytes == own.sum() * 4 and zoo.weights.shape == (40, own.max())
    x = torch.randn(3, 3, 32, 32)
    out = forward_zoo("wild_park", archs, torch.as_tensor(arch_ids), zoo.weights[np.arange(40)], x)
    assert out.shape == (40, 3, 10) and torch.isfinite(out).all()

