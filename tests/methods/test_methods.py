import numpy as np
import pytest
import torch

from fake_zoo import make_zoo, register_tiny
from probegen.errors import ProbegenError
from probegen.methods import METHODS, build_method
from probegen.methods.classifier import Classifier
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch
from probegen.probes.dead_leaves import render, to_input_range

MLP_ARCHS = [{"in": 2, "hidden": 5, "out": 1}, {"in": 2, "hidden": 3, "out": 1}]  # two archs, one probe space
SMALL = {"hidden": 16, "layers": 3}
POOL = render(8, 32, seed=0)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def _zoos():
    return {
        "tiny_mlp": make_zoo("tiny_mlp", MLP_ARCHS, 10),
        "tiny_image": make_zoo("tiny_image", [{"channels": 3, "out": 4}], 6, task="regression"),
        "siren": make_zoo("siren", [DWSNETS_ARCH], 6, num_classes=10),
        "small_cnn": make_zoo("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], 6, task="regression"),
    }


def _batch(zoo):
    return zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())


def test_registry_knows_every_method_and_its_kind():
    assert {n: METHODS[n].kind for n in ("probegen", "vanilla", "synthetic", "mlp", "statnn")} == {
        "probegen": "probe", "vanilla": "probe", "synthetic": "probe", "mlp": "weights", "statnn": "weights"}


@pytest.mark.parametrize("zoo_name", ["tiny_mlp", "tiny_image", "siren", "small_cnn"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_and_outputs_the_right_shape(name, zoo_name):
    zoo = _zoos()[zoo_name]
    try:
        method = build_method(name, zoo, SMALL, num_probes=4, probe_pool=POOL, seed=0)
    except ProbegenError as err:  # a method not defined for this family says so in one line
        assert "cannot run on" in str(err) and zoo_name in str(err)
        pytest.skip(str(err))
    w, a = _batch(zoo)
    out = method(w, a)
    expected = (len(zoo), zoo.num_classes) if zoo.task == "classification" else (len(zoo),)
    assert out.shape == expected and torch.isfinite(out).all()
    out.sum().backward()  # differentiable end to end
    assert method.flops_per_model() > 0
    if METHODS[name].kind == "probe":
        probes = method.probes()
        fam_shape = method.input_shape
        assert probes.shape == (4, *fam_shape)
        if len(fam_shape) == 3 and name != "synthetic":
            assert probes.abs().max() <= 1  # generated / free images are tanh-bounded


def test_unknown_method_and_unknown_cfg_key():
    zoo = _zoos()["tiny_mlp"]
    with pytest.raises(ProbegenError, match=r"unknown method 'nope'; known: \[.*'probegen'.*\]"):
        build_method("nope", zoo, {}, num_probes=4)
    with pytest.raises(ProbegenError, match="unknown key 'hiden'"):
        build_method("mlp", zoo, {"hiden": 3}, num_probes=4)
    # training keys belong to train() and are accepted
    build_method("mlp", zoo, {"lr": 1e-3, "optimizer": "adamw", "weight_decay": 0, "grad_clip": None, **SMALL},
                  num_probes=4)


def test_classifier_is_six_linear_layers_of_256_by_default():
    zoo = _zoos()["siren"]
    method = build_method("probegen", zoo, {}, num_probes=8, seed=0)
    linears = [m for m in method.head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 256)] + [(256, 256)] * 4 + [(256, 10)]
    assert len(method.head.net) == 11  # ReLU between, none after the last


def test_build_is_seeded():
    zoo = _zoos()["siren"]
    a = build_method("probegen", zoo, SMALL, num_probes=4, seed=3).state_dict()
    b = build_method("probegen", zoo, SMALL, num_probes=4, seed=3).state_dict()
    c = build_method("probegen", zoo, SMALL, num_probes=4, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["latents"], c["latents"])


def test_synthetic_trains_only_the_classifier():
    zoo = _zoos()["small_cnn"]
    method = build_method("synthetic", zoo, SMALL, num_probes=5, probe_pool=POOL, seed=0)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    expected = to_input_range(torch.from_numpy(POOL[:5]), (1, 32, 32))  # first K pool images, gray in [-1, 1]
    assert torch.allclose(method.probes(), expected)
    before = method.probes().clone()
    opt = torch.optim.Adam(method.parameters(), lr=0.1)
    w, a = _batch(zoo)
    method(w, a).pow(2).mean().backward()
    opt.step()
    assert torch.equal(method.probes(), before)
    assert "fixed.fixed" in method.state_dict()  # saved with the model


def test_synthetic_coordinates_are_uniform_in_the_square():
    method = build_method("synthetic", _zoos()["siren"], SMALL, num_probes=2000, seed=0)
    p = method.probes()
    assert p.shape == (2000, 2) and p.min() >= -1 and p.max() <= 1
    assert abs(p.mean().item()) < 0.05 and abs(p.var().item() - 1 / 3) < 0.03


def test_probing_response_is_the_family_forward_in_probe_order():
    zoo = _zoos()["siren"]
    method = build_method("vanilla", zoo, SMALL, num_probes=6, seed=0)
    w, a = _batch(zoo)
    from probegen.nets import siren
    expected = torch.stack([siren.reference_module(DWSNETS_ARCH, row)(method.probes()) for row in w])
    # sin(30 x) of N(0, .5) weights amplifies float32 rounding: compare relatively
    assert torch.allclose(method.responses(w, a), expected, rtol=1e-4, atol=1e-4)  # (B, K, 1)
    logits = method.head(expected.flatten(1))
    assert torch.allclose(method(w, a), logits, atol=1e-4)


def test_statnn_statistics_equal_a_numpy_reference():
    # two architectures with different tensor sizes; padding columns beyond each arch are ignored
    zoo = make_zoo("tiny_mlp", MLP_ARCHS, 7, seed=1)
    method = build_method("statnn", zoo, SMALL, num_probes=1)
    w, a = _batch(zoo)
    feats = method.statistics(w, a).numpy()
    assert feats.shape == (7, 4 * 7)
    for i in range(len(zoo)):
        arch = MLP_ARCHS[a[i]]
        row, start, expected = zoo.weights[i].numpy().astype(np.float64), 0, []
        for _, shape in [("", (arch["hidden"], 2)), ("", (arch["hidden"],)), ("", (1, arch["hidden"])), ("", (1,))]:
            t = row[start:start + int(np.prod(shape))]
            start += t.size
            var = t.var(ddof=1) if t.size > 1 else 0.0
            expected += [t.mean(), var, *np.quantile(t, [0, 0.25, 0.5, 0.75, 1])]
        np.testing.assert_allclose(feats[i], expected, rtol=1e-5, atol=1e-6)


def test_weight_methods_standardise_with_train_statistics():
    zoo = make_zoo("tiny_mlp", MLP_ARCHS, 40, seed=2)
    train_idx = np.arange(30)
    for name in ("mlp", "statnn"):
        method = build_method(name, zoo, SMALL, num_probes=1)
        method.prepare(zoo, train_idx)
        w, a = _batch(zoo)
        raw = w if name == "mlp" else method.statistics(w, a)
        x = ((raw - method.mean) / method.std)[:30]
        varying = raw[:30].std(0) > 0
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
        assert torch.allclose(x[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum())), atol=1e-3)
        assert "mean" in method.state_dict() and "std" in method.state_dict()


def test_flops_per_model():
    zoo = _zoos()["siren"]
    K = 16
    probing = build_method("probegen", zoo, SMALL, num_probes=K)
    per_probe = 2 * (2 * 32 + 32 * 32 + 32 * 1)  # SIREN: 2 x multiply-adds of its three layers
    assert probing.flops_per_model() == K * per_probe + Classifier(K, 10, 16, 3).flops()
    cnn = build_method("vanilla", _zoos()["small_cnn"], SMALL, num_probes=K)
    macs = 15 * 15 * 16 * 9 + 7 * 7 * 16 * 16 * 9 + 3 * 3 * 16 * 16 * 9 + 16 * 10  # 32 -> 15 -> 7 -> 3, fc
    assert cnn.flops_per_model() == K * 2 * macs + Classifier(K * 10, 1, 16, 3).flops()
    mlp = build_method("mlp", zoo, SMALL, num_probes=K)
    assert mlp.flops_per_model() == 2 * (1185 * 16 + 16 * 16 + 16 * 10)


def test_synthetic_image_probes_say_whether_the_pool_is_missing_or_too_small():
    zoo = _zoos()["small_cnn"]
    with pytest.raises(ProbegenError, match=r"dead_leaves.npy\) is missing; run the render_probes stage"):
        build_method("synthetic", zoo, SMALL, num_probes=4, probe_pool=None)
    with pytest.raises(ProbegenError, match=r"needs 16 Dead-Leaves images, the pool has 8; raise dead_leaves.pool_size"):
        build_method("synthetic", zoo, SMALL, num_probes=16, probe_pool=POOL)
