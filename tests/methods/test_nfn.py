"""The NFN methods nfn_np and nfn_hnp (probegen/methods/nfn_{np,hnp}.py): families, shape groups, learning,
FLOPs."""

import pytest
import torch

from fake_zoo import make_zoo, split_of
from probegen.errors import ProbegenError
from probegen.methods import METHODS, build_method, method_cfg
from probegen.nets.siren import DWSNETS_ARCH
from probegen.nets.small_cnn import zoo_arch
from probegen.nn.nfn import GaussianFourier
from probegen.training import train

NAMES = ("nfn_np", "nfn_hnp")
RESIDUAL = {"in_channels": 3, "channels": [4, 8, 4], "kernel_size": [3, 3, 3], "stride": [1, 1, 1],
            "padding": [1, 1, 1], "residual": [-1, -1, 0], "activation": ["relu"] * 3, "num_classes": 10}
SMALL = {"hidden": 8, "layers": 2, "head_hidden": 32, "head_dropout": 0.0, "fourier_size": 8}
FIT = dict(epochs=8, batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=5e-4, grad_clip=10.0, eval_every=20,
           device="cpu", progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: on a loaded 2-core machine two OpenMP threads spin more than they help."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_residual_connections_are_refused_in_one_line(name):
    zoo = make_zoo("wild_park", [RESIDUAL], 4, task="regression")
    torch.manual_seed(0)
    for build in (lambda: build_method(name, zoo, {}, num_probes=None),  # by family name
                  lambda: METHODS[name](zoo, method_cfg(name, {}))):  # by the layout's residual links
        with pytest.raises(ProbegenError) as err:
            build()
        message = str(err.value)
        assert message.startswith(f"method '{name}': cannot run on the wild_park family (NFN needs one fixed "
                                  "architecture without residual connections") and "\n" not in message


@pytest.mark.parametrize("name", NAMES)
def test_architectures_of_different_depths_are_refused(name):
    deeper = {**DWSNETS_ARCH, "hidden": [32, 32, 32]}
    zoo = make_zoo("siren", [DWSNETS_ARCH, deeper], 4, num_classes=10)
    with pytest.raises(ProbegenError, match=rf"method '{name}': cannot run on the siren family .*2 architectures "
                                            "differ in depth"):
        build_method(name, zoo, {}, num_probes=None)


@pytest.mark.parametrize("name", NAMES)
def test_relu_and_tanh_small_cnns_are_one_shape_group(name):
    zoo = make_zoo("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], 8, task="regression")
    method = build_method(name, zoo, SMALL, num_probes=None).eval()
    w, a = zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())
    groups = method.groups(w, a)
    assert len(groups) == 1 and groups[0][0] is None  # the whole batch in one call, in order
    with torch.no_grad():
        together = method(w, a)
        for arch in (0, 1):
            rows = torch.nonzero(a == arch).squeeze(1)
            torch.testing.assert_close(method(w[rows], a[rows]), together[rows], rtol=1e-5, atol=1e-6)
    assert together.shape == (8,)


def test_defaults_are_the_reference_configs():
    zoo = make_zoo("siren", [DWSNETS_ARCH], 4, num_classes=10)
    np_ = build_method("nfn_np", zoo, {}, num_probes=None)
    hnp = build_method("nfn_hnp", zoo, {}, num_probes=None)

    def widths(method):  # the global term of W_0 writes fixed(W_0) x channels
        return [layer.maps[0].out_features // method.spaces[0].tensors[0].fixed for layer in method.net.layers]

    # neural-graphs' INR NFN: NP [512] x 3, 256 Gaussian frequencies + IO code; NFN's CIFAR10-GS: HNP [16, 16, 5]
    assert widths(np_) == [512, 512, 512] and np_.net.fourier.out_features == 512 and np_.net.io.out_extra == 13
    assert widths(hnp) == [16, 16, 5] and hnp.net.fourier is None and hnp.net.io is None
    heads = [[(m.in_features, m.out_features) for m in x.net.head if isinstance(m, torch.nn.Linear)]
             for x in (np_, hnp)]
    assert heads[0] == [(6 * 512, 1000), (1000, 1000), (1000, 10)]  # mean-pooled: 2 x 3 tensors x 512
    assert heads[1][1:] == [(1000, 1000), (1000, 10)]
    assert not np_.stackable and hnp.stackable  # dropout 0.5 draws random numbers in forward


def test_hnp_learns_a_cnn_zoo():
    zoo = make_zoo("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], 100, task="regression", seed=2)
    method = build_method("nfn_hnp", zoo, {"hidden": 8, "head_hidden": 32}, num_probes=None, seed=0)
    result = train(method, zoo, split_of(len(zoo)), seed=0, **FIT)
    assert result.metrics["test"] >= 0.6, result.metrics  # Kendall's tau; 0 = unrelated


def test_np_learns_an_inr_zoo():
    zoo = make_zoo("siren", [DWSNETS_ARCH], 150, num_classes=3, std=0.05, seed=3)
    method = build_method("nfn_np", zoo, {**SMALL, "fourier_size": 16}, num_probes=None, seed=0)  # defaults: scale 1
    result = train(method, zoo, split_of(len(zoo)), seed=0, **{**FIT, "epochs": 30})
    assert result.metrics["test"] >= 0.8, result.metrics  # chance: 1/3


@pytest.mark.parametrize("name", NAMES)
def test_flops_are_the_linear_work_of_one_forward(name):
    """Counted independently with hooks: 2 in out per row of every Linear call and of the Fourier map."""
    zoo = make_zoo("small_cnn", [zoo_arch("relu")], 3, task="regression")
    method = build_method(name, zoo, SMALL, num_probes=None).eval()
    count = []

    def on_call(module, inputs, output):
        d_in = module.in_features if isinstance(module, torch.nn.Linear) else module.B.shape[0]
        d_out = module.out_features if isinstance(module, torch.nn.Linear) else module.B.shape[1]
        count.append(2 * inputs[0].numel() // d_in * d_in * d_out)

    hooks = [m.register_forward_hook(on_call) for m in method.modules()
             if isinstance(m, (torch.nn.Linear, GaussianFourier))]
    with torch.no_grad():
        method(zoo.weights[:1], torch.zeros(1, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert method.flops_per_model() == sum(count) > 0
    assert (method.net.fourier is not None) == (name == "nfn_np")
