"""NG-T: learns separable fake zoos (one architecture, and Wild Park's mixed architectures), a mixed batch
(padded to its largest graph) predicts what each architecture predicts alone, FLOPs are the shapes of its
forward, bad cfg gives one-line errors."""

import numpy as np
import pytest
import torch

from fake_zoo import MIXED_WILD_PARK, TWO_MLPS, make_zoo, register_tiny, split_of, whole_batch
from probegen.errors import ProbegenError
from probegen.methods import build_method
from probegen.methods.classifier import Classifier
from probegen.training import stackable, train

ARCHS, WP = TWO_MLPS, MIXED_WILD_PARK
SMALL = {"hidden": 16, "layers": 2, "d_edge": 8, "d_attn_hid": 16, "d_node_hid": 16, "d_edge_hid": 8, "heads": 2,
         "d_out_hid": 16, "dropout": 0.0}
SCHEDULE = {"batch_size": 16, "lr": 1e-2, "optimizer": "adamw", "weight_decay": 5e-4, "grad_clip": 10.0,
            "device": "cpu", "progress": False}


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def test_learns_a_separable_zoo_quickly():
    zoo = make_zoo("tiny_mlp", ARCHS, 200, num_classes=3, signal=3.0)
    method = build_method("ng_t", zoo, SMALL, num_probes=None, seed=0)
    assert not stackable(method, zoo)
    res = train(method, zoo, split_of(200), seed=0, epochs=8, eval_every=20, **SCHEDULE)
    assert res.metrics["test"] >= 0.9, res.metrics  # seeds 0-2 reach 1.0; chance is 1/3


def test_learns_a_mixed_architecture_regression_zoo():
    zoo = make_zoo("wild_park", WP, 120, task="regression", std=0.3, signal=3.0)
    method = build_method("ng_t", zoo, SMALL, num_probes=None, seed=0)
    res = train(method, zoo, split_of(120), seed=0, epochs=8, eval_every=10, **SCHEDULE)
    # Kendall's tau on 24 test models: seeds 0-2 reach 0.75-0.89; chance is 0 +- 0.15
    assert res.metrics["test"] >= 0.6, res.metrics


def test_a_mixed_batch_predicts_what_each_architecture_predicts_alone():
    ids = np.array([1, 0, 0, 1, 1, 0, 1])  # 12- and 8-node graphs: the smaller ones are padded in the mix
    zoo = make_zoo("wild_park", WP, len(ids), task="regression", arch_ids=ids, std=0.3)
    method = build_method("ng_t", zoo, {}, num_probes=None, seed=0)
    method.prepare(zoo, np.arange(len(ids)))
    method.eval()
    w, a = whole_batch(zoo)
    with torch.no_grad():
        mixed = method(w, a)
        for arch in (0, 1):
            rows = np.flatnonzero(ids == arch)
            torch.testing.assert_close(mixed[rows], method(w[rows], a[rows]), rtol=1e-5, atol=1e-5)


def expected_flops(N, E, F, n_out, out_dim, cfg, R=128):
    """2 x multiply-adds of the forward of one graph, from its sizes (dense over all N^2 node pairs)."""
    d, de, da, dn, deh, L = (cfg[k] for k in ("hidden", "d_edge", "d_attn_hid", "d_node_hid", "d_edge_hid", "layers"))
    P = N * N
    macs = N * R + N * 2 * R * d + N * d * d  # node Fourier features, two projections
    macs += (E + 1) * (F * R + 2 * R * de + de * de)  # edges, and the one zero edge that fills non-edges
    attention = N * d * 3 * da + P * de * 4 * da + 2 * P * da + N * da * d  # qkv, scores and values, out
    node = N * d * d + 2 * N * d * dn  # lin0, node MLP
    edge = P * 2 * de * deh + 2 * N * d * deh + P * deh * de + 2 * P * de * deh  # edge MLP0, MLP1
    macs += L * (attention + node) + (L - 1) * edge  # no edge update in the last layer
    return 2 * macs + Classifier(n_out * d, out_dim, cfg["d_out_hid"], cfg["head_layers"]).flops()


def test_flops_are_the_shapes_of_the_forward_averaged_over_the_zoo():
    ids = [0, 0, 0, 1]
    zoo = make_zoo("tiny_mlp", ARCHS, 4, num_classes=3, arch_ids=ids)
    method = build_method("ng_t", zoo, {}, num_probes=None)
    cfg = method.cfg
    per_arch = [expected_flops(3 + h, 3 * h, 1, 1, 3, cfg) for h in (5, 3)]  # no reverse edges by default
    assert method.flops_per_model() == round((3 * per_arch[0] + per_arch[1]) / 4) > 0


def test_the_reference_configs_build():
    from probegen.nets.siren import DWSNETS_ARCH
    siren = build_method("ng_t", make_zoo("siren", [DWSNETS_ARCH], 2, num_classes=10), {}, num_probes=None)
    layer = siren.rt.layers[0]
    assert len(siren.rt.layers) == 4 and layer.attn.heads == 8 and layer.attn.qkv_edge.in_features == 32
    assert siren.head.dims == [64, 128, 10]
    wp = build_method("ng_t", make_zoo("wild_park", WP, 2, task="regression"),
                      {"hidden": 32, "d_edge": 16, "layers": 3, "heads": 4, "head_layers": 3}, num_probes=None)
    assert wp.graphs.shape.kernel == (5, 5) and wp.head.dims == [2 * 32, 128, 128, 1]


def test_bad_cfg_is_a_one_line_error():
    zoo = make_zoo("tiny_mlp", ARCHS, 4)
    with pytest.raises(ProbegenError, match="method.ng_t: d_attn_hid 100 is not divisible by heads 8"):
        build_method("ng_t", zoo, {"d_attn_hid": 100}, num_probes=None)
    with pytest.raises(ProbegenError, match="method.ng_t: heads: expected a positive integer"):
        build_method("ng_t", zoo, {"heads": 0}, num_probes=None)
