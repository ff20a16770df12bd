"""The embedded digits INR zoo: exact gradients, DWSNets' Adam, early stopping, determinism, packing."""

import hashlib
import json
import math

import numpy as np
import torch
from sklearn.datasets import load_digits

from probegen.nets import siren
from probegen.zoo.embedded import digits_inr as zoo
from probegen.zoo.formats import dwsnets_inr as fmt
from probegen.zoo.packed import load_packed

ARCH = siren.DWSNETS_ARCH


def problem(n=6, seed=0):
    indices = zoo.select(load_digits().target, n, seed)
    targets, labels = zoo.digit_images(indices)
    weights = zoo.init_weights(ARCH, n, torch.Generator().manual_seed(seed))
    return weights, targets, siren.grid_coords(zoo.SIDE)


def autograd_loss(weights, targets, coords):
    return (siren.forward(ARCH, weights, coords) - targets).square().mean((1, 2))  # (N,)


def test_hand_backprop_matches_autograd_through_the_family_forward():
    weights, targets, coords = problem()
    weights = weights + 0.05 * torch.randn(weights.shape, generator=torch.Generator().manual_seed(1))
    mse, grad = zoo.loss_and_grad(ARCH, weights, targets, coords)
    w = weights.clone().requires_grad_()
    ref = autograd_loss(w, targets, coords)
    (ref_grad,) = torch.autograd.grad(ref.sum(), w)
    torch.testing.assert_close(mse, ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_fit_is_torch_adam_on_each_models_mse():
    weights, targets, coords = problem(n=3)
    w = weights.clone().requires_grad_()
    opt = torch.optim.Adam([w], lr=2e-3)
    for _ in range(5):
        opt.zero_grad()
        autograd_loss(w, targets, coords).sum().backward()
        opt.step()
    zoo.fit(ARCH, weights, targets, coords, steps=5, lr=2e-3, chunk=2, stop_psnr=math.inf, progress=False)
    torch.testing.assert_close(weights, w.detach(), rtol=1e-4, atol=1e-6)


def test_init_is_dwsnets():
    weights = zoo.init_weights(ARCH, 200, torch.Generator().manual_seed(0))
    (W0, b0), (W1, b1), (W2, b2) = siren.unflatten(ARCH, weights)
    # sine layers (the first one too: DWSNets never set is_first) U(+-sqrt(6/fan_in)/30), zero bias;
    # the output layer is nn.Linear's default U(+-1/sqrt(fan_in)) for weight and bias
    for p, bound in ((W0, math.sqrt(6 / 2) / 30), (W1, math.sqrt(6 / 32) / 30), (W2, 1 / math.sqrt(32)),
                     (b2, 1 / math.sqrt(32))):
        assert 0.9 * bound < p.abs().max() <= bound
    assert not b0.any() and not b1.any()


def test_models_freeze_at_the_stop_psnr():
    weights, targets, coords = problem(n=8)
    free = weights.clone()
    stop = 22.0
    final = zoo.fit(ARCH, weights, targets, coords, steps=150, lr=6e-3, chunk=4, stop_psnr=stop, progress=False)
    unstopped = zoo.fit(ARCH, free, targets, coords, steps=150, lr=6e-3, chunk=4, stop_psnr=math.inf,
                        progress=False)
    assert (final >= stop).all()  # every model got there and kept the weights that scored it
    assert final.mean() < stop + 2 < unstopped.mean()  # and then stopped improving


def test_stratified_subset():
    labels = load_digits().target
    chosen = zoo.select(labels, 20, seed=3)
    assert list(chosen) == sorted(chosen) and len(set(chosen)) == 20
    assert np.bincount(labels[chosen], minlength=10).tolist() == [2] * 10
    assert list(zoo.select(labels, 20, seed=3)) == list(chosen)
    assert list(zoo.select(labels, 20, seed=4)) != list(chosen)
    assert len(zoo.select(labels, None, seed=0)) == 1797


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.pth"))}


def test_build_is_deterministic_improves_and_packs(tmp_path):
    kwargs = dict(num_models=20, steps=40, seed=0, progress=False)
    summary = zoo.build(tmp_path / "a", **kwargs)
    zoo.build(tmp_path / "b", **kwargs)
    assert digests(tmp_path / "a") == digests(tmp_path / "b") and len(digests(tmp_path / "a")) == 20
    # the whole folder is byte-identical, its summary included: the build time is returned, not written
    assert (tmp_path / "a" / "build_summary.json").read_bytes() == (tmp_path / "b" / "build_summary.json").read_bytes()
    assert json.loads((tmp_path / "a" / "build_summary.json").read_text()) == {
        k: v for k, v in summary.items() if k != "seconds"} and summary["seconds"] > 0
    assert summary["num_models"] == 20 and summary["steps"] == 40

    weights, targets, coords = problem(n=20)
    before = zoo.psnr(ARCH, weights, targets, coords, chunk=20)
    assert summary["mean_psnr"] > before.mean().item() + 10

    fmt.pack(tmp_path / "a", tmp_path / "packed", progress=False)
    packed = load_packed(tmp_path / "packed")
    digits = load_digits()
    indices = [int(i.split("/")[1].split("_")[-1]) for i in packed.meta["id"]]
    assert packed.labels.tolist() == digits.target[indices].tolist()
    assert set(packed.meta["split_hint"]) == {"training"}
    # the packed rows reproduce the images with the family's forward, at the PSNR the build reported
    rows = packed.weights[:]
    images, _ = zoo.digit_images(np.array(indices))
    packed_psnr = zoo.psnr(ARCH, rows, images, coords, chunk=20)
    assert abs(packed_psnr.mean().item() - summary["mean_psnr"]) < 1e-3
