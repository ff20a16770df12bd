"""NG-GNN: learns separable fake zoos (one architecture, and Wild Park's mixed architectures), a mixed batch
predicts what its per-architecture batches predict, FLOPs are the counted shapes of its forward, bad cfg
and unsupported activations give one-line errors, the state dict carries what prediction needs."""

import types

import numpy as np
import pytest
import torch

from fake_zoo import MIXED_WILD_PARK, TWO_MLPS, make_zoo, register_tiny, split_of, whole_batch
from probegen.errors import ProbegenError
from probegen.methods import build_method
from probegen.methods.classifier import Classifier
from probegen.nets.layout import Layer, Layout
from probegen.training import stackable, train

ARCHS, WP = TWO_MLPS, MIXED_WILD_PARK
SMALL = {"hidden": 16, "layers": 2, "dropout": 0.0}
SCHEDULE = {"batch_size": 16, "lr": 3e-3, "optimizer": "adamw", "weight_decay": 5e-4, "grad_clip": 10.0,
            "device": "cpu", "progress": False}


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def test_learns_a_separable_zoo_quickly():
    zoo = make_zoo("tiny_mlp", ARCHS, 200, num_classes=3, signal=3.0)
    method = build_method("ng_gnn", zoo, SMALL, num_probes=None, seed=0)
    assert not stackable(method, zoo)  # dropout / graph assembly: seeds train one by one
    res = train(method, zoo, split_of(200), seed=0, epochs=8, eval_every=20, **SCHEDULE)
    assert res.metrics["test"] >= 0.9, res.metrics  # seeds 0-2 reach 1.0; chance is 1/3


def test_learns_a_mixed_architecture_regression_zoo():
    zoo = make_zoo("wild_park", WP, 200, task="regression", std=0.3)
    method = build_method("ng_gnn", zoo, SMALL, num_probes=None, seed=0)
    res = train(method, zoo, split_of(200), seed=0, epochs=10, eval_every=20, **SCHEDULE)
    # Kendall's tau on 40 test models: seeds 0-2 reach 0.71-0.79; chance is 0 +- 0.11
    assert res.metrics["test"] >= 0.5, res.metrics


def test_a_mixed_batch_predicts_what_each_architecture_predicts_alone():
    ids = np.array([1, 0, 0, 1, 1, 0, 1])
    zoo = make_zoo("wild_park", WP, len(ids), task="regression", arch_ids=ids, std=0.3)
    method = build_method("ng_gnn", zoo, {}, num_probes=None, seed=0)
    method.prepare(zoo, np.arange(len(ids)))
    method.eval()
    w, a = whole_batch(zoo)
    with torch.no_grad():
        mixed = method(w, a)
        for arch in (0, 1):
            rows = np.flatnonzero(ids == arch)
            torch.testing.assert_close(mixed[rows], method(w[rows], a[rows]), rtol=1e-5, atol=1e-5)


def expected_flops(N, E, F, n_out, d, layers, out_dim, R=128):
    """2 x multiply-adds of every Linear of the forward, from the graph's sizes."""
    macs = N * R + N * 2 * R * d + N * d * d  # node Fourier features, two projections
    macs += E * F * R + E * 2 * R * d + E * d * d  # edge Fourier features, two projections
    macs += layers * (2 * N * d * d + E * d * 2 * d + N * 9 * d * d + N * d * d)  # PNA: pre, FiLM, post, lin
    macs += (layers - 1) * (2 * E * d * d + 2 * N * d * d)  # edge updates
    return 2 * macs + Classifier(n_out * d, out_dim, d, 3).flops()


def test_flops_are_the_shapes_of_the_forward_averaged_over_the_zoo():
    ids = [0, 0, 0, 1]  # 2 -> 5 -> 1 three times, 2 -> 3 -> 1 once
    zoo = make_zoo("tiny_mlp", ARCHS, 4, num_classes=3, arch_ids=ids)
    method = build_method("ng_gnn", zoo, {}, num_probes=None)
    # reverse edges (default): E = 2 x (2h + h); edge features [e, 0, e]: 3 wide; 1 output unit
    per_arch = [expected_flops(3 + h, 2 * 3 * h, 3, 1, 32, 4, 3) for h in (5, 3)]
    assert method.flops_per_model() == round((3 * per_arch[0] + per_arch[1]) / 4) > 0


def test_the_reference_configs_build_on_every_family():
    from probegen.nets.siren import DWSNETS_ARCH
    from probegen.nets.small_cnn import zoo_arch
    siren = build_method("ng_gnn", make_zoo("siren", [DWSNETS_ARCH], 2, num_classes=10), {}, num_probes=None)
    assert siren.graphs.shape.edge_dim == 3 and siren.head.dims[0] == 32  # one output neuron
    cnn = build_method("ng_gnn", make_zoo("small_cnn", [zoo_arch("relu")], 2, task="regression"),
                       {"hidden": 256, "reverse_edges": False}, num_probes=None)
    assert cnn.graphs.shape.edge_dim == 9 and cnn.head.dims[0] == 10 * 256  # 3x3 kernels; 10 output neurons
    assert len(cnn.gnn.convs) == 4 and cnn.gnn.dropout == 0.2


def test_bad_cfg_and_unsupported_activations_are_one_line_errors(monkeypatch):
    zoo = make_zoo("tiny_mlp", ARCHS, 4)
    with pytest.raises(ProbegenError, match="method.ng_gnn: hidden: expected a positive integer, got 0"):
        build_method("ng_gnn", zoo, {"hidden": 0}, num_probes=None)
    with pytest.raises(ProbegenError, match=r"method.ng_gnn: dropout: expected a number in \[0, 1\)"):
        build_method("ng_gnn", zoo, {"dropout": 1.5}, num_probes=None)
    from probegen import nets
    swish = types.SimpleNamespace(input_shape=lambda a: (2,), output_dim=lambda a: 1,
                                  layout=lambda a: Layout([Layer("l1", "linear", (3, 2), "swish"),
                                                           Layer("l2", "linear", (1, 3))]))
    monkeypatch.setitem(nets.FAMILIES, "swish_mlp", swish)
    zoo = make_zoo("tiny_mlp", [ARCHS[0]], 2)
    zoo.spec["family"] = "swish_mlp"
    with pytest.raises(ProbegenError) as err:
        build_method("ng_gnn", zoo, {}, num_probes=None)
    message = str(err.value)
    assert "ng_gnn" in message and "swish_mlp" in message and "swish" in message and "\n" not in message


def test_the_state_dict_carries_the_statistics():
    zoo = make_zoo("tiny_mlp", ARCHS, 20, num_classes=3)
    trained = build_method("ng_gnn", zoo, SMALL, num_probes=None, seed=0)
    trained.prepare(zoo, np.arange(15))
    assert trained.graphs.w_std.ne(1).all()
    fresh = build_method("ng_gnn", zoo, SMALL, num_probes=None, seed=1)
    fresh.load_state_dict(trained.state_dict())
    w, a = whole_batch(zoo)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(w, a), trained.eval()(w, a))
