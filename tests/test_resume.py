"""Killed runs resume: a real training stage process is SIGKILLed mid-run, rerun, and ends with the same
outputs, byte for byte, as a run that was never interrupted; stale and corrupt checkpoints are not resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, tiny_params
from probegen.nets.siren import DWSNETS_ARCH
from probegen.zoo.packed import PackedWriter

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
ZOO = "digits_inr"  # a zoo name the params know; its data here is a small random SIREN zoo


def make_project(root, n=96, epochs=60):
    """params.yaml + a packed zoo and a split: everything `python -m stages.train` reads."""
    rng = np.random.default_rng(0)
    spec = {"family": "siren", "task": "classification", "num_classes": 10, "format": "test"}
    rows = rng.uniform(-0.05, 0.05, (n, 1185)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    rows[:, -1] += labels / 10  # the output bias carries the label: learnable
    with PackedWriter(root / f"data/zoos/{ZOO}", capacity=n, total_params=n * 1185, spec=spec) as w:
        w.add(list(rows), labels, [{}] * n, [DWSNETS_ARCH] * n, [f"m{i}" for i in range(n)])
    (root / "data/splits").mkdir(parents=True)
    (root / f"data/splits/{ZOO}.json").write_text(json.dumps({"train": list(range(64)), "val": list(range(64, 80)),
                                                             "test": list(range(80, n))}))
    params = tiny_params(seeds=[0, 1], checkpoint={"every_steps": 3, "every_seconds": 0})
    params["train"][ZOO] = {"epochs": epochs, "batch_size": 16, "eval_every": 5}
    params["method"]["probegen"] = {**params["method"]["probegen"], "hidden": 32, "layers": 3}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def train(root, wait=True):
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", ZOO, "probegen"], cwd=root, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return proc


def outputs(root):
    folder = root / f"models/{ZOO}/probegen"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint(root):
    return root / f".probegen/checkpoints/{ZOO}-probegen.pt"


def kill_after_a_checkpoint(root):
    """Start the stage, SIGKILL it as soon as it has written a checkpoint a few steps in; -> the step."""
    proc = train(root, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint(root).exists():
            try:
                step = torch.load(checkpoint(root), weights_only=True)["step"]
            except Exception:  # caught mid-rename: try again
                continue
            if step >= 9:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the stage finished (or hung) before it could be killed mid-run")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("straight"))
    train(root)
    assert not checkpoint(root).exists()  # removed when the run completes
    return outputs(root)


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, uninterrupted):
    root = make_project(tmp_path)
    step = kill_after_a_checkpoint(root)
    assert checkpoint(root).exists() and not (root / f"models/{ZOO}/probegen/seed-0.json").exists()
    train(root)
    assert not checkpoint(root).exists()
    resumed = outputs(root)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:  # models, metrics and the whole curves: the same bytes
        assert resumed[name] == uninterrupted[name], f"{name} differs after resuming from step {step}"


def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, uninterrupted):
    root = make_project(tmp_path)
    kill_after_a_checkpoint(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["method"]["probegen"]["lr"] = 0.001  # another run: the checkpoint's key no longer matches
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train(root)
    curve = (root / f"models/{ZOO}/probegen/live/seed-0/plots/metrics/train/loss.tsv").read_text()
    assert curve != uninterrupted["live/seed-0/plots/metrics/train/loss.tsv"].decode()


def test_a_corrupt_checkpoint_is_reported_in_one_line_and_ignored(tmp_path, uninterrupted):
    root = make_project(tmp_path)
    kill_after_a_checkpoint(root)
    checkpoint(root).write_bytes(checkpoint(root).read_bytes()[:100])  # truncated
    proc = train(root, wait=False)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "unreadable checkpoint" in warnings[0] and "starting over" in warnings[0]
    assert outputs(root) == uninterrupted  # started over: the same run


class _Payload:
    """Pickles to a call of os.system: what a poisoned checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_checkpoint_runs_nothing_and_is_ignored(tmp_path):
    from fake_zoo import make_zoo, split_of
    from probegen.methods import build_method
    from probegen.training import Checkpoint, train

    marker = tmp_path / "ran"
    path = tmp_path / "ck.pt"
    torch.save({"key": "k", "step": 1, "members": [_Payload(marker)]}, path)
    told = []
    zoo = make_zoo("siren", [DWSNETS_ARCH], 40, num_classes=10, std=0.05)
    method = build_method("mlp", zoo, {"hidden": 8, "layers": 2}, num_probes=None, seed=0)
    result = train(method, zoo, split_of(40), seed=0, epochs=1, batch_size=8, lr=1e-3, eval_every=2,
                   device="cpu", progress=False, checkpoint=Checkpoint(path, "k", 1, 0, on_corrupt=told.append))
    assert not marker.exists()  # the payload never ran
    assert len(told) == 1 and "unreadable checkpoint" in told[0]
    assert result.metrics["steps"] == 3  # trained from scratch


def test_seeds_trained_one_after_another_keep_the_finished_ones_across_a_kill(tmp_path, monkeypatch):
    """A kill during seed 1 of a sequential run (dropout: not stackable) does not train seed 0 again, and the
    results equal an uninterrupted run's."""
    from fake_zoo import make_zoo, split_of
    from probegen import training
    from probegen.methods import build_method

    zoo = make_zoo("siren", [DWSNETS_ARCH], 40, num_classes=10, std=0.05)
    cfg = {"hidden": 8, "layers": 2, "head_dropout": 0.2, "fourier": False, "io_encoding": False}

    def run(checkpoint=None, on_eval=None):
        methods = [build_method("nfn_np", zoo, cfg, num_probes=None, seed=s) for s in (0, 1)]
        return training.train_seeds(methods, zoo, split_of(40), seeds=[0, 1], epochs=2, batch_size=8, lr=1e-3,
                                    eval_every=2, device="cpu", progress=False, checkpoint=checkpoint,
                                    on_eval=on_eval, stack=False)

    uninterrupted = [r.metrics for r in run()]
    steps = []
    real_step = training._step
    monkeypatch.setattr(training, "_step", lambda *a: steps.append(1) or real_step(*a))

    def killed_in_seed_1(seed, row):
        if seed == 1:
            raise KeyboardInterrupt  # stands for the kill: raised inside the loop, after seed 0 finished
    ck = training.Checkpoint(tmp_path / "ck.pt", "k", every_steps=1)
    with pytest.raises(KeyboardInterrupt):
        run(ck, killed_in_seed_1)
    assert (tmp_path / "ck.0.pt").exists()  # seed 0's finished state
    per_seed = uninterrupted[0]["steps"]
    steps.clear()
    resumed = [r.metrics for r in run(ck)]
    assert len(steps) < per_seed  # seed 1 resumed from its checkpoint; seed 0 trained nothing
    assert resumed == uninterrupted
    assert not list(tmp_path.glob("ck*.pt"))  # every checkpoint removed once all seeds are done
