"""The dwsnets method (probegen/methods/dwsnets.py): families, batching, standardisation, learning, FLOPs."""

import numpy as np
import pytest
import torch

from fake_zoo import make_zoo, register_tiny, split_of
from probegen.errors import ProbegenError
from probegen.methods import METHODS, build_method, method_cfg
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch
from probegen.nn.dws import SAB
from probegen.training import train, train_seeds

WILD_PARK = {"in_channels": 3, "channels": [4, 8], "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
             "residual": [-1, -1], "activation": ["relu", "relu"], "num_classes": 10}
SMALL = {"hidden": 8, "layers": 2}
FIT = dict(epochs=6, batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=5e-4, grad_clip=10.0, eval_every=20,
           device="cpu", progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Training a DWSNet is thousands of small ops: on a loaded 2-core machine two OpenMP threads spin far
    more than they help (measured: 20x slower steps), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def direct(name, zoo, cfg):
    """Build without build_method's family check by name, to reach the method's own layout checks."""
    torch.manual_seed(0)
    return METHODS[name](zoo, method_cfg(name, cfg))


@pytest.mark.parametrize("family, arch", [("small_cnn", zoo_arch("relu")), ("wild_park", WILD_PARK)])
def test_convolutional_families_are_refused_in_one_line(family, arch):
    zoo = make_zoo(family, [arch], 4, task="regression")
    for build in (lambda: build_method("dwsnets", zoo, {}, num_probes=None), lambda: direct("dwsnets", zoo, {})):
        with pytest.raises(ProbegenError) as err:
            build()
        message = str(err.value)
        assert message.startswith(f"method 'dwsnets': cannot run on the {family} family (DWSNets layers are defined "
                                  "for MLP weight spaces") and "\n" not in message


def test_mlps_of_several_widths_share_the_network(monkeypatch):
    register_tiny(monkeypatch)
    archs = [{"in": 2, "hidden": 5, "out": 1}, {"in": 2, "hidden": 3, "out": 1}]
    zoo = make_zoo("tiny_mlp", archs, 9)
    method = build_method("dwsnets", zoo, SMALL, num_probes=None).eval()
    w, a = zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())
    with torch.no_grad():
        mixed = method(w, a)
        for arch in (0, 1):  # each width alone gives the same predictions as inside the mixed batch
            rows = torch.nonzero(a == arch).squeeze(1)
            torch.testing.assert_close(method(w[rows], a[rows]), mixed[rows])
    assert mixed.shape == (9, 3)


def test_standardisation_is_per_fixed_entry_over_models_and_hidden_neurons():
    zoo = make_zoo("siren", [DWSNETS_ARCH], 40, num_classes=10, std=0.05)
    method = build_method("dwsnets", zoo, SMALL, num_probes=None)
    method.prepare(zoo, np.arange(30))
    (_, _, tensors), = method.groups(zoo.weights[:30], torch.zeros(30, dtype=torch.long))
    W0, b0, W1, b1, W2, b2 = method.standardized(tensors, 0)
    for t, axes in ((W0, (0, 1)), (b0, (0, 1)), (W1, (0, 1, 2)), (W2, (0, 2)), (b2, (0,))):
        torch.testing.assert_close(t.mean(axes), torch.zeros_like(t.mean(axes)), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.std(axes, unbiased=False), torch.ones_like(t.mean(axes)), atol=1e-4, rtol=0)
    assert method.mean_0.shape == (2,) and method.mean_2.shape == (1,)  # W_0: per input; W_1: one scalar


def test_learns_a_separable_inr_zoo():
    zoo = make_zoo("siren", [DWSNETS_ARCH], 150, num_classes=3, std=0.05, seed=3)
    method = build_method("dwsnets", zoo, SMALL, num_probes=None, seed=0)
    result = train(method, zoo, split_of(len(zoo)), seed=0, **FIT)
    assert result.metrics["test"] >= 0.8, result.metrics  # chance: 1/3


def test_seeds_train_as_a_vmapped_ensemble_like_alone():
    """Batch norm keeps running statistics per seed when the seeds are stacked (probegen/training.py). Compared
    on what the models compute: the biases in front of batch norm get float-noise gradients only (BN
    cancels them), which Adam turns into full steps, so those parameters drift apart harmlessly."""
    zoo = make_zoo("siren", [DWSNETS_ARCH], 40, num_classes=3, std=0.05)
    split = split_of(len(zoo))
    runs = {}
    for stack in (True, False):
        methods = [build_method("dwsnets", zoo, SMALL, num_probes=None, seed=s) for s in (0, 1)]
        runs[stack] = train_seeds(methods, zoo, split, seeds=[0, 1], stack=stack, **{**FIT, "epochs": 2})
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_allclose(a.curve["train_loss"], b.curve["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(a.curve["val_metric"], b.curve["val_metric"])
        np.testing.assert_array_equal(a.test_pred, b.test_pred)
        for k in a.state_dict:
            if "running" in k:  # each seed's batch-norm statistics
                torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("set_layer", ["sab", "ds"])
def test_flops_are_the_linear_and_attention_work_of_one_forward(set_layer):
    """Counted independently with hooks: 2 in out per row of every Linear call, and for SAB the two
    attention products (scores and weighted values), 2 n^2 f each."""
    zoo = make_zoo("siren", [DWSNETS_ARCH], 4, num_classes=10)
    method = build_method("dwsnets", zoo, {"hidden": 8, "layers": 3, "set_layer": set_layer}, num_probes=None)
    method.eval()
    count = []

    def on_linear(module, inputs, output):
        count.append(2 * inputs[0].numel() // module.in_features * module.in_features * module.out_features)

    def on_sab(module, inputs, output):
        n, f = output.shape[1], output.shape[2]
        count.append(2 * 2 * n * n * f)

    hooks = [m.register_forward_hook(on_sab if isinstance(m, SAB) else on_linear)
             for m in method.modules() if isinstance(m, (torch.nn.Linear, SAB))]
    with torch.no_grad():
        method(zoo.weights[:1], torch.zeros(1, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert method.flops_per_model() == sum(count) > 0
    assert any(isinstance(m, SAB) for m in method.modules()) == (set_layer == "sab")
