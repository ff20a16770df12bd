"""Run files (probegen/saved.py): written by the training stage, read back safely and strictly."""

import hashlib
import json

import numpy as np
import pytest
import torch

from fake_zoo import make_zoo, register_tiny, split_of
from probegen import saved
from probegen.errors import ProbegenError
from probegen.experiment import save_outputs
from probegen.methods import METHODS, build_method
from probegen.nets.siren import DWSNETS_ARCH
from probegen.probes.dead_leaves import render
from probegen.training import train
from probegen.zoo.packed import PackedWriter

SMALL = {"hidden": 16, "layers": 3, "lr": 1e-3, "optimizer": "adam"}
POOL = render(8, 32, seed=0)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def trained(name, zoo, seed=0, num_probes=4):
    """A briefly trained method and what the training stage hands to save_outputs."""
    num_probes = num_probes if METHODS[name].kind == "probe" else None
    method = build_method(name, zoo, SMALL, num_probes=num_probes, probe_pool=POOL, seed=seed)
    result = train(method, zoo, split_of(len(zoo)), epochs=2, batch_size=4, lr=1e-3, eval_every=2, seed=seed,
                   device="cpu", progress=False)
    # the stage adds the wall time to the metrics JSON; it must stay out of the model file
    metrics = {**result.metrics, "zoo": "tiny", "method": name, "num_probes": num_probes, "train_seconds": 1.5}
    return method, result, metrics


def output_paths(zoo, method, seed, root):
    """What the training stage passes to save_outputs (the model file and the metrics JSON, and a curve)."""
    return {"model": root / f"models/{zoo}/{method}-{seed}.pt", "metrics": root / f"metrics/{zoo}/{method}-{seed}.json",
            "curve": root / f"curves/{zoo}/{method}-{seed}.csv", "live": root / f"live/{zoo}/{method}-{seed}"}


def save(tmp_path, name, zoo, seed=0):
    method, result, metrics = trained(name, zoo, seed)
    paths = output_paths("tiny", name, seed, tmp_path)
    save_outputs(paths, result, metrics, SMALL)
    return method.eval(), result, paths


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("family, task", [("tiny_mlp", "classification"), ("tiny_image", "regression")])
def test_every_method_round_trips_exactly(tmp_path, name, family, task):
    archs = [{"in": 2, "hidden": 5, "out": 3}] if family == "tiny_mlp" else [{"channels": 3, "out": 1}]
    zoo = make_zoo(family, archs, 20, task=task)
    method, result, paths = save(tmp_path, name, zoo)
    torch.load(paths["model"], weights_only=True)  # what the file must be: tensors and plain values only
    run = saved.load_run(paths["model"], zoo="tiny", method=name, seed=0)
    assert (run.zoo, run.method, run.seed, run.method_cfg) == ("tiny", name, 0, SMALL)
    np.testing.assert_array_equal(run.test_pred, result.test_pred)
    np.testing.assert_array_equal(run.test_target, result.test_target)
    assert run.metrics["test"] == result.metrics["test"] and "train_seconds" not in run.metrics
    assert "train_seconds" in json.loads(paths["metrics"].read_text())  # the timing stays in the JSON
    rebuilt = saved.rebuild(run, zoo, POOL)
    assert not rebuilt.training
    w, a = zoo.weights[:], torch.from_numpy(zoo.arch_ids.copy())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(w, a), method(w, a), rtol=0, atol=0)


def test_same_state_writes_the_same_bytes(tmp_path):
    zoo = make_zoo("tiny_mlp", [{"in": 2, "hidden": 5, "out": 3}], 20)
    _, result, metrics = trained("mlp", zoo)
    digests = []
    for attempt in range(2):
        paths = output_paths("tiny", "mlp", 0, tmp_path / str(attempt))
        save_outputs(paths, result, {**metrics, "train_seconds": 1.0 + attempt}, SMALL)
        digests.append(hashlib.sha256(paths["model"].read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def packed_siren_zoo(root, n=12):
    rng = np.random.default_rng(0)
    d = sum(int(np.prod(s)) for s in [(32, 2), (32,), (32, 32), (32,), (1, 32), (1,)])
    spec = {"family": "siren", "task": "classification", "num_classes": 10, "format": "test"}
    with PackedWriter(root / "data/zoos/tiny", capacity=n, total_params=n * d, spec=spec) as w:
        w.add(rng.normal(0, 0.3, (n, d)).astype(np.float32), rng.integers(0, 10, n), [{}] * n,
              [DWSNETS_ARCH] * n, [f"m{i}" for i in range(n)])
    from probegen.zoo.packed import load_packed
    return load_packed(root / "data/zoos/tiny")


def test_load_trained_rebuilds_from_the_saved_config_alone(tmp_path):
    zoo = packed_siren_zoo(tmp_path)
    method, _, paths = save(tmp_path, "probegen", zoo)
    rebuilt, packed, run = saved.load_trained(paths["model"], tmp_path, zoo="tiny", method="probegen", seed=0)
    assert run.num_probes == 4 and len(packed) == len(zoo)
    torch.testing.assert_close(rebuilt.probes(), method.probes(), rtol=0, atol=0)


def test_the_run_must_be_the_one_asked_for(tmp_path):
    zoo = make_zoo("tiny_mlp", [{"in": 2, "hidden": 5, "out": 3}], 20)
    _, _, paths = save(tmp_path, "statnn", zoo, seed=0)
    with pytest.raises(ProbegenError, match=r"holds the run zoo=tiny method=statnn seed=0, not seed=1"):
        saved.load_run(paths["model"], zoo="tiny", method="statnn", seed=1)
    with pytest.raises(ProbegenError, match=r"not method=mlp"):
        saved.load_run(paths["model"], method="mlp")


@pytest.mark.parametrize("damage, message", [
    ("extra_key", r"unexpected \['head.extra'\]"),
    ("missing_key", r"missing \['mean'\]"),
    ("other_config", r"other shape \[.*head"),
])
def test_a_state_that_does_not_fit_is_refused(tmp_path, damage, message):
    zoo = make_zoo("tiny_mlp", [{"in": 2, "hidden": 5, "out": 3}], 20)
    _, result, metrics = trained("mlp", zoo)
    state, cfg = dict(result.state_dict), dict(SMALL)
    if damage == "extra_key":
        state["head.extra"] = torch.zeros(1)
    if damage == "missing_key":
        del state["mean"]
    if damage == "other_config":
        cfg["hidden"] = 8  # the saved config says 8 wide, the state is 16 wide
    path = tmp_path / "run.pt"
    saved.save_run(path, zoo="tiny", method="mlp", seed=0, method_cfg=cfg, num_probes=None, state_dict=state,
                   test_pred=result.test_pred, test_target=result.test_target, metrics=metrics)
    run = saved.load_run(path)
    with pytest.raises(ProbegenError, match=message) as err:
        saved.rebuild(run, zoo)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_files_of_the_old_format_are_refused_in_one_line(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {}, "metrics": {}, "method_cfg": {}, "test_pred": np.zeros(3),
                "test_target": np.zeros(3)}, path)
    with pytest.raises(ProbegenError, match=r"refused by the safe loader .*numpy.*rerun its training stage") as err:
        saved.load_run(path)
    assert "\n" not in str(err.value)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ProbegenError, match="not a probegen run file"):
        saved.load_run(path)


def test_missing_or_damaged_files_are_one_line(tmp_path):
    with pytest.raises(ProbegenError, match="missing"):
        saved.load_run(tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ProbegenError, match="corrupt or unreadable run file") as err:
        saved.load_run(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


def test_only_plain_values_are_saved(tmp_path):
    kwargs = dict(zoo="tiny", method="mlp", seed=0, method_cfg=SMALL, num_probes=None, state_dict={},
                  test_pred=np.zeros(2), test_target=np.zeros(2))
    saved.save_run(tmp_path / "ok.pt", **kwargs, metrics={"test": np.float64(0.5), "steps": np.int64(3)})
    assert saved.load_run(tmp_path / "ok.pt").metrics == {"test": 0.5, "steps": 3}
    with pytest.raises(TypeError, match=r"metrics.curve: a ndarray"):
        saved.save_run(tmp_path / "bad.pt", **kwargs, metrics={"curve": np.zeros(2)})
    assert not (tmp_path / "bad.pt").exists()
