"""localize@: path patching on ProbeGen predictors, on tiny packed zoos written here (random SIRENs / CNNs)
and hand-set predictors whose head reads only one probe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from probegen.errors import ProbegenError
from probegen.methods import build_method
from probegen.methods.classifier import Classifier
from probegen.nets.small_cnn import zoo_arch
from probegen.patching import Patcher, evaluate, kl
from probegen.nets import get_layout
from probegen.patching.probers import (LocalizeConfig, ProbeMixer, _first_order, align, analyse_layers, analyse_probes,
                                       layer_effects, layer_graph, layer_hypotheses, layer_names, layer_units,
                                       make_pairs, permutation_sanity, probe_graph, probe_hypothesis,
                                       random_permutation, responses, run_localize, score_layers)
from probegen.zoo.packed import PackedWriter, load_packed

ROOT = Path(__file__).resolve().parents[2]
SIREN = {"in_dim": 2, "hidden": [8, 8], "out_dim": 1, "w0": 30.0, "out_bias": 0.5}


def wild_park_arch(channels, residual, act="relu"):
    n = len(channels)
    return {"in_channels": 3, "channels": channels, "kernel_size": [3] * n, "stride": [1] * n, "padding": [1] * n,
            "residual": residual, "activation": [act] * n, "num_classes": 10}


# Two residual links into and out of channels of different widths, and a plain 2-layer net: mixed depths.
RESIDUAL = wild_park_arch([6, 4, 8, 5], [-1, -1, 0, 1], "tanh")
SHALLOW = wild_park_arch([4, 4], [-1, -1])
CFG = {"hidden": 16, "layers": 3, "latent_dim": 4}
K, READ = 6, 2  # probes; the one probe the hand-set head reads


def write_zoo(root, name, family, archs, n, task="classification", seed=0):
    """A packed zoo of n random models at root/data/zoos/<name> and a split with half the models in test."""
    from probegen.nets import num_params

    rng = np.random.default_rng(seed)
    arch_ids = np.arange(n) % len(archs)
    D = max(num_params(family, a) for a in archs)
    weights = (rng.normal(0, 0.3, (n, D))).astype(np.float32)
    labels = rng.integers(0, 3, n) if task == "classification" else rng.uniform(0, 1, n).astype(np.float32)
    spec = {"family": family, "task": task, "num_classes": 3 if task == "classification" else None, "format": "test"}
    rows = [weights[i, :num_params(family, archs[a])] for i, a in enumerate(arch_ids)]
    with PackedWriter(root / f"data/zoos/{name}", capacity=n, total_params=n * D, spec=spec) as w:
        w.add(rows, labels, [{}] * n, [archs[a] for a in arch_ids], [f"m{i}" for i in range(n)])
    idx = rng.permutation(n).tolist()
    split = {"train": idx[:n // 4], "val": idx[n // 4:n // 2], "test": idx[n // 2:]}
    (root / "data/splits").mkdir(parents=True, exist_ok=True)
    (root / f"data/splits/{name}.json").write_text(json.dumps(split))
    return load_packed(root / f"data/zoos/{name}"), split


def reads_one_probe(zoo, k=READ):
    """A ProbeGen predictor whose head ignores every probe but k (its other input weights are zero)."""
    m = build_method("probegen", zoo, CFG, num_probes=K, seed=0).eval()
    with torch.no_grad():
        cols = torch.arange(K * m.response_dim).view(K, m.response_dim)
        keep = torch.zeros(K * m.response_dim, dtype=torch.bool)
        keep[cols[k]] = True
        m.head.net[0].weight[:, ~keep] = 0.0
    return m


@pytest.fixture
def siren_zoo(tmp_path):
    return write_zoo(tmp_path, "tiny", "siren", [SIREN], 48)


def pair_rows(zoo, split, n=24):
    ref, cf, _ = make_pairs(zoo, split["test"], n, seed=0)
    w = lambda idx: zoo.weights[idx]
    return w(ref), w(cf), zoo.arch_ids[ref]


# ------------------------------------------------------------------------------------------------ probes


def test_closed_form_mix_equals_the_engine():
    torch.manual_seed(0)
    B, k, out = 16, 5, 3  # several outputs per probe: the head's input is probe-major
    head = Classifier(k * out, 4, hidden=12, layers=3)
    r_ref, r_cf = torch.randn(B, k, out), torch.randn(B, k, out)
    graph = probe_graph(head, k)
    masks = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 0, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    hyps = [probe_hypothesis(graph, torch.nonzero(m).flatten().tolist()) for m in masks]
    engine = torch.stack(list(Patcher(graph, r_ref, r_cf).outputs(hyps)))
    mixer = ProbeMixer(head, r_ref, r_cf)
    torch.testing.assert_close(mixer.outputs(masks), engine, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the engine's endpoints are the plain runs
        torch.testing.assert_close(engine[0], head(r_cf.flatten(1)))
        torch.testing.assert_close(engine[-1], head(r_ref.flatten(1)))
    torch.testing.assert_close(mixer.extend(mixer.z_cf, torch.tensor([0, 3])),
                               mixer.outputs(torch.eye(k)[[0, 3]]), rtol=1e-5, atol=1e-6)


def test_first_order_screen_is_the_directional_derivative():
    torch.manual_seed(0)
    B, k = 32, 7
    head = Classifier(k * 2, 3, hidden=16, layers=3).double()
    r_ref, r_cf = torch.randn(B, k, 2, dtype=torch.float64), torch.randn(B, k, 2, dtype=torch.float64)
    mixer, d = ProbeMixer(head, r_ref, r_cf), kl()
    with torch.no_grad():
        ref_out = head(r_ref.flatten(1))
        z = mixer.z_cf + mixer.delta[[1, 4]].sum(0)  # S = {1, 4}
        aue = lambda z: d(ref_out, mixer.rest(z)).mean()
        eps = 1e-6
        numeric = torch.stack([(aue(z + eps * mixer.delta[j]) - aue(z - eps * mixer.delta[j])) / (2 * eps)
                               for j in range(k)])
    torch.testing.assert_close(_first_order(mixer, d, ref_out, z), numeric, rtol=1e-5, atol=1e-8)


def test_greedy_selects_the_only_probe_the_head_reads(siren_zoo):
    zoo, split = siren_zoo
    m = reads_one_probe(zoo)
    w_ref, w_cf, arch = pair_rows(zoo, split)
    ids = torch.from_numpy(arch)
    r_ref, r_cf = responses(m, w_ref, ids), responses(m, w_cf, ids)
    out = analyse_probes(m, r_ref, r_cf, "kl", target=0.9, top_probes=3, n_boot=50, seed=0)
    assert out["ate"] > 0
    assert out["selected"] == [READ] and out["smallest_size"] == 1
    assert out["greedy"][0]["explained"] == 0.0  # S = {} is the counterfactual run
    assert out["greedy"][1]["explained"] == pytest.approx(1.0, abs=1e-5)
    singles = [r["explained"] for r in out["single"]]
    assert singles[READ] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(v) < 1e-6 for k, v in enumerate(singles) if k != READ)
    assert out["interactions"]["probes"][0] == READ
    graph = probe_graph(m.head, K)
    rows = evaluate(graph, [probe_hypothesis(graph, range(K)), probe_hypothesis(graph, [])], r_ref, r_cf,
                    n_boot=50)
    assert rows[0]["explained"] == 1.0 and rows[1]["explained"] == 0.0


def test_interaction_is_pair_minus_singles(siren_zoo):
    zoo, split = siren_zoo
    m = build_method("probegen", zoo, CFG, num_probes=K, seed=1).eval()  # a head that reads every probe
    w_ref, w_cf, arch = pair_rows(zoo, split)
    ids = torch.from_numpy(arch)
    out = analyse_probes(m, responses(m, w_ref, ids), responses(m, w_cf, ids), "kl", target=0.99,
                         top_probes=3, n_boot=20, seed=0)
    inter, single = out["interactions"], {r["probe"]: r["explained"] for r in out["single"]}
    top = inter["probes"]
    assert top == sorted(single, key=lambda k: -single[k])[:3]
    graph = probe_graph(m.head, K)
    pair = evaluate(graph, [probe_hypothesis(graph, top[:2])], responses(m, w_ref, ids), responses(m, w_cf, ids),
                    n_boot=20)[0]["explained"]
    assert inter["interaction"][0][1] == pytest.approx(pair - single[top[0]] - single[top[1]], abs=1e-9)
    assert out["greedy"][-1]["explained"] >= 0.99 - 1e-6  # greedy stops at the target


# ------------------------------------------------------------------------------------------------ layers


def test_layer_hypothesis_runs_the_network_with_that_layer_from_the_reference(siren_zoo):
    zoo, split = siren_zoo
    m = build_method("probegen", zoo, CFG, num_probes=K, seed=1).eval()
    w_ref, w_cf, arch = pair_rows(zoo, split, n=8)
    graph = layer_graph(m, SIREN, m.probes().detach())
    hyps = layer_hypotheses(graph)
    patcher = Patcher(graph, w_ref, w_cf)
    assert [n for n, _, _ in layer_units("siren", SIREN)] == ["seq.0", "seq.1", "seq.2"]
    for name, s, e in layer_units("siren", SIREN):
        mixed = w_cf.clone()
        mixed[:, s:e] = w_ref[:, s:e]
        with torch.no_grad():
            want = m.head(responses(m, mixed, torch.from_numpy(arch)).flatten(1))
        torch.testing.assert_close(patcher.output(hyps[f"only:{name}"]), want, rtol=1e-5, atol=1e-5)
    scored = score_layers(layer_effects(m, w_ref, w_cf, arch, "kl"), ["seq.0", "seq.1", "seq.2"], 50, 0)
    assert scored["ate"] > 0
    assert scored["all"]["explained"] == 1.0  # every layer from the reference is the reference run


@pytest.mark.parametrize("family,archs", [("siren", [SIREN]), ("small_cnn", [zoo_arch("relu"), zoo_arch("tanh")]),
                                          ("wild_park", [RESIDUAL, SHALLOW])])
def test_alignment_undoes_a_function_preserving_permutation(tmp_path, family, archs):
    zoo, _ = write_zoo(tmp_path, "z", family, archs, 6)
    m = build_method("probegen", zoo, CFG, num_probes=3, seed=0).eval()
    for a, arch in enumerate(archs):
        w = zoo.weights[zoo.arch_ids == a]
        ids = torch.full((len(w),), a)
        permuted = random_permutation(family, archs, w, ids.numpy(), seed=1)
        assert not torch.equal(permuted, w)
        torch.testing.assert_close(responses(m, permuted, ids), responses(m, w, ids), rtol=1e-4, atol=1e-5)
        aligned, _ = align(family, arch, w, permuted)
        assert torch.equal(aligned, w)


def test_per_layer_alignment_of_a_residual_net_would_break_its_function(tmp_path, monkeypatch):
    """Why ties matter: permuting the residual's two layers independently is not function-preserving, and
    the sanity check turns such a wrong symmetry into an error instead of a number."""
    zoo, split = write_zoo(tmp_path, "wp", "wild_park", [RESIDUAL], 12, task="regression")
    m = build_method("probegen", zoo, CFG, num_probes=3, seed=0).eval()
    w, ids = zoo.weights[:], torch.zeros(12, dtype=torch.long)
    lay = get_layout("wild_park", RESIDUAL)
    untied = [torch.stack([torch.randperm(lay.layers[l].units_out) for _ in range(12)]) for l in lay.hidden]
    with pytest.raises(ProbegenError, match="residual segment|tied channels"):
        lay.permute(w, untied)
    monkeypatch.setattr(lay, "check_perms", lambda perms: None)  # what a layout without ties would do
    broken = lay.permute(w, untied)
    assert (responses(m, broken, ids) - responses(m, w, ids)).abs().max() > 1e-3
    monkeypatch.setattr("probegen.patching.probers.random_permutation", lambda f, a, w, i, s: lay.permute(w, untied))
    with pytest.raises(ProbegenError, match="sanity check failed"):
        permutation_sanity(m, w, ids.numpy(), "sq", seed=0)


def test_layers_of_a_zoo_of_mixed_depths_are_scored_on_the_pairs_that_have_them(tmp_path):
    zoo, split = write_zoo(tmp_path, "wp", "wild_park", [RESIDUAL, SHALLOW], 40, task="regression")
    m = build_method("probegen", zoo, CFG, num_probes=3, seed=0).eval()
    ref, cf, _ = make_pairs(zoo, split["test"], 24, seed=0)
    arch = zoo.arch_ids[ref]
    assert set(arch) == {0, 1}
    assert layer_names(m, arch) == ["layers.0", "layers.1", "layers.2", "layers.3", "fc"]
    out = analyse_layers(m, zoo.weights[ref], zoo.weights[cf], arch, "sq", n_boot=20, seed=0)
    pairs = {r["layer"]: r["pairs"] for r in out["aligned"]["only"]}
    deep = int((arch == 0).sum())
    assert pairs == {"layers.0": 24, "layers.1": 24, "layers.2": deep, "layers.3": deep, "fc": 24}
    assert out["aligned"]["all"]["explained"] == pytest.approx(1.0)
    assert out["sanity"]["function_max_abs_diff"] < 1e-4


def test_alignment_moves_an_unrelated_network_closer(siren_zoo):
    zoo, split = siren_zoo
    w_ref, w_cf, _ = pair_rows(zoo, split, n=8)
    aligned, _ = align("siren", SIREN, w_ref, w_cf)
    assert ((aligned - w_ref).norm(dim=1) <= (w_cf - w_ref).norm(dim=1) + 1e-5).all()
    assert ((aligned - w_ref).norm(dim=1) < (w_cf - w_ref).norm(dim=1) - 1e-3).any()


def test_permuted_reference_gives_zero_aue_once_aligned(siren_zoo):
    zoo, split = siren_zoo
    m = build_method("probegen", zoo, CFG, num_probes=K, seed=1).eval()
    w_ref, _, arch = pair_rows(zoo, split, n=8)
    out = permutation_sanity(m, w_ref, arch, "kl", seed=0)
    assert out["function_max_abs_diff"] < 1e-4
    assert out["aligned_max_abs_weight_diff"] == 0.0 and out["aligned_exact_fraction"] == 1.0
    assert set(out["aue_aligned"]) == {"only:seq.0", "only:seq.1", "only:seq.2", "all_but:seq.0",
                                       "all_but:seq.1", "all_but:seq.2", "all"}
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in out["aue_aligned"].values())
    assert min(v for k, v in out["aue_raw"].items() if k != "all") > 1e-5  # unaligned mixing changes the function


# ------------------------------------------------------------------------------------------------- pairs


def test_pairs_differ_in_label_and_share_the_architecture(tmp_path):
    zoo, split = write_zoo(tmp_path, "c", "small_cnn", [zoo_arch("relu"), zoo_arch("tanh")], 40, task="regression")
    ref, cf, rule = make_pairs(zoo, split["test"], 30, seed=0)
    test = np.asarray(split["test"])
    labels = np.asarray(zoo.labels)
    quartile = np.searchsorted(np.quantile(labels[test], [0.25, 0.5, 0.75]), labels, side="right")
    assert set(ref) <= set(test) and set(cf) <= set(test) and "quartiles" in rule
    assert (zoo.arch_ids[ref] == zoo.arch_ids[cf]).all()
    assert (np.abs(quartile[ref] - quartile[cf]) >= 2).all()
    zoo, split = write_zoo(tmp_path, "s", "siren", [SIREN], 40)
    ref, cf, _ = make_pairs(zoo, split["test"], 50, seed=0)  # 20 test models: each is a reference 2 or 3 times
    assert (zoo.labels[ref] != zoo.labels[cf]).all()
    assert sorted(np.unique(np.unique(ref, return_counts=True)[1])) == [2, 3] and len(set(ref)) == 20


# ------------------------------------------------------------------------------------------------- stage


def save_predictor(root, zoo_name, m):
    from probegen import saved
    from probegen.experiment import run_paths
    saved.save_run(run_paths(zoo_name, "probegen", 0, root)["model"], zoo=zoo_name, method="probegen", seed=0,
                   method_cfg=dict(m.cfg), num_probes=K, state_dict=m.state_dict(), test_pred=np.zeros(1),
                   test_target=np.zeros(1), metrics={"metric": "accuracy", "num_probes": K})


def test_run_localize_writes_metrics_and_plots(tmp_path, siren_zoo):
    zoo, _ = siren_zoo
    save_predictor(tmp_path, "tiny", reads_one_probe(zoo))
    out = run_localize("tiny", 0, n_pairs=16, n_boot=20, target=0.9, top_probes=3, root=tmp_path)
    saved = json.loads((tmp_path / "metrics/localize/tiny.json").read_text())
    assert saved["probes"]["selected"] == out["probes"]["selected"] == [READ]
    assert saved["layers"]["aligned"]["all"]["explained"] == 1.0
    assert saved["layers"]["layers"] == ["seq.0", "seq.1", "seq.2"]
    assert sorted(p.name for p in (tmp_path / "plots/localize/tiny").iterdir()) == [
        "interactions.png", "layers.png", "probes_explained.png", "probes_selected.png"]


def test_missing_predictor_names_its_stage(tmp_path):
    with pytest.raises(ProbegenError, match=r"run probe@nozoo-probegen first"):
        run_localize("nozoo", 0, n_pairs=4, n_boot=2, target=0.9, root=tmp_path)


def test_the_stage_localizes_the_first_probing_method_or_says_it_was_not_trained(tmp_path, siren_zoo):
    from probegen.patching.probers import localize_stage

    zoo, _ = siren_zoo
    save_predictor(tmp_path, "tiny", reads_one_probe(zoo))  # probegen seed 0 trained
    line = localize_stage("tiny", LocalizeConfig(n_pairs=8, n_boot=5), ["vanilla", "probegen"], root=tmp_path)
    assert "skipped, vanilla seed 0 was not trained" in line  # never falls back to another method's stale model
    saved = json.loads((tmp_path / "metrics/localize/tiny.json").read_text())
    assert saved["skipped"].startswith("vanilla seed 0") and (tmp_path / "plots/localize/tiny").is_dir()
    line = localize_stage("tiny", LocalizeConfig(n_pairs=8, n_boot=5), ["probegen", "vanilla"], root=tmp_path)
    assert line.startswith("localize tiny (probegen seed 0)")
    assert json.loads((tmp_path / "metrics/localize/tiny.json").read_text())["method"] == "probegen"


def test_config_rejects_bad_params():
    assert LocalizeConfig.from_params(None) == LocalizeConfig()
    with pytest.raises(ProbegenError, match="localize.n_pair"):
        LocalizeConfig.from_params({"n_pair": 3})
    for key, bad in (("n_pairs", 1), ("seed", -1), ("n_boot", "many"), ("top_probes", True), ("target", 1.5)):
        with pytest.raises(ProbegenError, match=f"localize.{key}"):
            LocalizeConfig.from_params({key: bad})


def stage(root, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.localize", *args], cwd=root, env=env,
                          capture_output=True, text=True)


def test_stage_runs_and_reports_bad_params_in_one_line(tmp_path, siren_zoo):
    zoo, _ = siren_zoo
    save_predictor(tmp_path, "tiny", reads_one_probe(zoo))
    params = {"localize": {"seed": 0, "n_pairs": 12, "n_boot": 10, "target": 0.9, "top_probes": 2},
              "methods": {"probe": ["probegen"], "weights": ["mlp"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage(tmp_path, "tiny")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "metrics/localize/tiny.json").read_text())["n_pairs"] == 12
    params["localize"]["n_pairs"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage(tmp_path, "tiny")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "localize.n_pairs" in lines[0], proc.stderr
