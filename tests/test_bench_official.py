"""probegen.bench_official: the harness that runs the official ProbeGen main.py beside our training stage.

The fast tests drive it with a fake official repository (a main.py written here that takes the official
command line and writes its log.csv format, and imports torchvision as the official ProbeGen.py does) and a
fake project root (a tiny packed zoo and a stages/train.py that writes our metrics files), so the split
translation, the stub, the log parsing and both runners are checked without the real code. The slow test runs
the real official repository for one epoch when its mirror is on this machine.
"""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from probegen import bench_official as bo
from probegen.errors import ProbegenError

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_MIRROR = Path("/work/.mirror/jonkahana+ProbeGen/repo")

# val / test accuracy the fake official main.py logs at its k-th evaluation: the best val (0.7) comes twice,
# neither time at the end, so "test at the first best val" and "last test" differ from each other.
FAKE_VAL = [0.5, 0.7, 0.6, 0.7, 0.55]
FAKE_TEST = [0.40, 0.65, 0.62, 0.71, 0.58]

FAKE_MAIN = '''
import argparse, csv, json, os, sys
from pathlib import Path
import ProbeGen  # from this file's folder, as the official main.py imports it (and it imports torchvision)

p = argparse.ArgumentParser()
p.add_argument("--exp_name", required=True)
for name, kind in [("seed", int), ("dataset", str), ("n_tokens", int), ("d_hid", int), ("n_layers", int),
                   ("gen_type", str), ("batch_size", int), ("lr", float), ("epochs", int), ("eval_every", int),
                   ("n_workers", int), ("device", str)]:
    p.add_argument("--" + name, type=kind)
args = p.parse_args()
dataset_dir = Path("experiments/inr_classification/dataset")
splits = json.loads((dataset_dir / "mnist_splits.json").read_text())
for name, part in splits.items():
    for path in part["path"]:
        if not (dataset_dir / path).is_file():
            sys.exit(f"missing checkpoint {dataset_dir / path}")
exp_dir = Path(f"experiments/{args.dataset}/runs/{args.exp_name}")
exp_dir.mkdir(parents=True)
(exp_dir / "seen.json").write_text(json.dumps({"args": vars(args), "splits": splits}))
steps_per_epoch = -(-len(splits["train"]["label"]) // args.batch_size)
eval_steps = [s for s in range(1, args.epochs * steps_per_epoch) if s % args.eval_every == 0]
VAL, TEST = VAL_AND_TEST
with open(exp_dir / "log.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["exp_name", "epoch", "global_step", "train_loss", "val_loss", "val_acc", "test_acc",
                "val_kendalltau", "test_kendalltau", "test_loss"])
    for k, step in enumerate(eval_steps):
        epoch = step // steps_per_epoch
        w.writerow([args.exp_name, epoch, step, 1.0, 1.0, VAL[k % len(VAL)] + args.seed / 100,
                    TEST[k % len(TEST)] + args.seed / 100, "", "", 1.0])
'''.replace("VAL_AND_TEST", repr((FAKE_VAL, FAKE_TEST)))

FAKE_STAGE = '''
"""A fake `python -m stages.train <zoo> <method>`: writes models/<zoo>/<method>/seed-<s>.json per params seed."""
import json, sys
from pathlib import Path
import yaml

zoo, method = sys.argv[1:]
params = yaml.safe_load(Path("params.yaml").read_text())
for name in ("zoos", "splits", "probes"):
    assert Path("data", name).is_dir(), name
out = Path(f"models/{zoo}/{method}")
out.mkdir(parents=True)
for seed in params["seeds"]:
    (out / f"seed-{seed}.json").write_text(json.dumps(
        {"test": 0.8 + seed / 100, "val": 0.9, "best_step": params["train"][zoo]["epochs"], "seed": seed,
         "params_seen": {"num_probes": params["num_probes"], "device": params["device"],
                         "train": params["train"][zoo], "method": params["method"][method]}}))
'''


def fake_official_repo(path, main=FAKE_MAIN):
    path.mkdir(parents=True)
    (path / "main.py").write_text(main)
    (path / "ProbeGen.py").write_text("import torchvision  # as the official file does\n")
    (path / "data.py").write_text("")
    return path


def fake_root(path, labels=(3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8)):
    """A project root with a packed zoo of len(labels) checkpoints, a split and a fake training stage."""
    ids = [f"digits-inrs/digits_png_training_{d}_{i}/checkpoints/model_final.pth" for i, d in enumerate(labels)]
    for rel in ids:
        (path / "data/raw/digits_inr" / rel).parent.mkdir(parents=True)
        (path / "data/raw/digits_inr" / rel).write_bytes(b"")
    packed = path / "data/zoos/digits_inr"
    packed.mkdir(parents=True)
    with open(packed / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "arch", "split_hint"], *[[rel, 0, "training"] for rel in ids]])
    np.save(packed / "labels.npy", np.array(labels))
    (packed / "spec.json").write_text(json.dumps({"family": "siren", "num_models": len(labels)}))
    (path / "data/splits").mkdir(parents=True)
    (path / "data/splits/digits_inr.json").write_text(json.dumps({"train": [0, 2, 4, 6, 8, 10, 11], "val": [1, 5],
                                                                 "test": [3, 7, 9]}))
    (path / "data/probes").mkdir()
    (path / "params.yaml").write_text(yaml.safe_dump({
        "num_probes": 128, "seeds": [0, 1, 2], "device": "auto",
        "train": {"digits_inr": {"epochs": 20, "batch_size": 32, "eval_every": 80}},
        "method": {"probegen": {"lr": 0.0003, "schedule": {"digits_inr": {"epochs": 5}}}}}))
    (path / "stages").mkdir()
    (path / "stages/__init__.py").write_text("")
    (path / "stages/train.py").write_text(FAKE_STAGE)
    return path


def test_official_split_keeps_our_models_and_labels(tmp_path):
    root = fake_root(tmp_path)
    split = bo.official_split(root, "digits_inr")
    assert [len(split[s]["path"]) for s in ("train", "val", "test")] == [7, 2, 3]
    assert split["test"]["path"][1] == "digits_inr/digits-inrs/digits_png_training_6_7/checkpoints/model_final.pth"
    assert split["test"]["label"] == [1, 6, 3]  # rows 3, 7, 9
    assert split["val"]["label"] == [1, 9]
    (root / "data/zoos/digits_inr/spec.json").write_text(json.dumps({"family": "cnn"}))
    with pytest.raises(ProbegenError, match="SIREN zoos only"):
        bo.official_split(root, "digits_inr")


def test_parse_official_log_takes_the_first_best_val(tmp_path):
    log = tmp_path / "log.csv"
    rows = [["global_step", "val_acc", "test_acc", "val_kendalltau"], [100, 0.5, 0.4, ""], [200, 0.8, 0.6, ""],
            [300, 0.8, 0.9, ""], [400, 0.7, 0.75, ""]]
    with open(log, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    parsed = bo.parse_official_log(log)
    assert (parsed["best_step"], parsed["val_acc"], parsed["test_acc"]) == (200, 0.8, 0.6)
    assert (parsed["last_step"], parsed["last_test_acc"], parsed["evals"]) == (400, 0.75, 4)
    with pytest.raises(ProbegenError, match="not written"):
        bo.parse_official_log(tmp_path / "missing.csv")


def test_both_sides_on_a_fake_official_repo(tmp_path):
    repo = fake_official_repo(tmp_path / "ProbeGen")
    root = fake_root(tmp_path / "project")
    keep = tmp_path / "scratch"
    result = bo.official_vs_ours(repo, root=root, epochs=3, num_probes=16, batch_size=2, eval_every=2,
                                 seeds=(1, 2), n_workers=0, keep=keep)
    # 7 training models, batch 2 -> 4 steps an epoch, 12 steps: evaluations at 2, 4, 6, 8, 10
    for seed in (1, 2):
        official = result["official"]["per_seed"][seed]
        assert official["evals"] == 5 and official["last_step"] == 10
        assert official["best_step"] == 4  # the first of the two best val values (k = 1 and k = 3)
        assert official["test_acc"] == pytest.approx(FAKE_TEST[1] + seed / 100)
        assert official["last_test_acc"] == pytest.approx(FAKE_TEST[4] + seed / 100)
        seen = json.loads((keep / f"official_run/experiments/mnist_inr/runs/bench_seed_{seed}/seen.json").read_text())
        assert seen["splits"] == bo.official_split(root, "digits_inr")
        assert {k: seen["args"][k] for k in ("seed", "n_tokens", "batch_size", "epochs", "eval_every", "device",
                                             "n_workers", "gen_type", "dataset")} == {
            "seed": seed, "n_tokens": 16, "batch_size": 2, "epochs": 3, "eval_every": 2, "device": "cpu",
            "n_workers": 0, "gen_type": "linear_2_no_acts", "dataset": "mnist_inr"}
    assert result["official"]["test_acc"] == pytest.approx(FAKE_TEST[1] + 0.015)  # mean over seeds 1, 2
    ours = result["ours"]
    assert ours["per_seed"][2] == {"test": pytest.approx(0.82), "val": 0.9, "best_step": 3}
    assert ours["test"] == pytest.approx(0.815)
    metrics = json.loads((keep / "ours/models/digits_inr/probegen/seed-1.json").read_text())
    assert metrics["params_seen"] == {"num_probes": 16, "device": "cpu",
                                      "train": {"epochs": 3, "batch_size": 2, "eval_every": 2},
                                      "method": {"lr": 0.0003, "schedule": {}}}
    assert result["speedup"] == pytest.approx(result["official"]["seconds"] / ours["seconds"])
    assert 0 < result["official"]["cpu_seconds"] and 0 < ours["cpu_seconds"]  # two processes ran: not 0 s CPU
    lines = bo.report_lines(result)
    assert "official" in lines[1] and f"{result['official']['test_acc']:.4f}" in lines[1]
    assert "ours" in lines[2] and "0.8150" in lines[2]
    assert lines[-1].endswith(f"2: {result['official']['per_seed'][2]['test_acc']:.4f} / 0.8200")


def test_rounds_alternate_which_side_goes_first_and_report_medians(tmp_path):
    repo = fake_official_repo(tmp_path / "ProbeGen")
    root = fake_root(tmp_path / "project")
    keep = tmp_path / "scratch"
    result = bo.official_vs_ours(repo, root=root, epochs=1, num_probes=16, batch_size=2, eval_every=2,
                                 seeds=(1,), n_workers=0, keep=keep, rounds=3)
    assert len(result["rounds"]) == 3
    ratios = [official / ours for official, ours, _ in result["rounds"]]
    assert [ratio for _, _, ratio in result["rounds"]] == pytest.approx(ratios)
    assert result["speedup"] == pytest.approx(sorted(ratios)[1])
    assert result["ours"]["seconds"] == pytest.approx(sorted(ours for _, ours, _ in result["rounds"])[1])

    def finished(r, side):  # when that side's run of round r wrote its result
        path = {"official": "official_run/experiments/mnist_inr/runs/bench_seed_1/log.csv",
                "ours": "ours/models/digits_inr/probegen/seed-1.json"}[side]
        return (keep / f"round-{r}" / path).stat().st_mtime_ns

    assert finished(0, "official") < finished(0, "ours") and finished(1, "ours") < finished(1, "official")
    assert finished(2, "official") < finished(2, "ours")
    assert bo.report_lines(result)[-1].startswith("  rounds    official / ours s (ratio)")


def test_rounds_below_one_are_one_error_line_and_run_nothing(tmp_path, capsys):
    keep = tmp_path / "scratch"
    assert bo.main([str(tmp_path / "ProbeGen"), "--rounds", "0", "--keep", str(keep)]) == 1
    assert capsys.readouterr().err == "error: bench_official: rounds must be a positive integer, got 0\n"
    assert not keep.exists()


def test_a_git_dir_is_checked_out_with_only_the_files_main_imports(tmp_path):
    work = fake_official_repo(tmp_path / "work")
    (work / "big_split.json").write_text("{}")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *args, cwd=work: subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                                                 env={**env, "PATH": "/usr/bin:/bin"})
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "fake")
    git("clone", "-q", "--bare", str(work), str(tmp_path / "mirror"), cwd=tmp_path)
    checkout = bo.official_checkout(tmp_path / "mirror", tmp_path / "checkout")
    assert sorted(p.name for p in checkout.iterdir() if p.name != ".git") == sorted(bo.OFFICIAL_FILES)
    assert (checkout / "main.py").read_text() == FAKE_MAIN
    with pytest.raises(ProbegenError, match="neither a ProbeGen work tree"):
        bo.official_checkout(tmp_path / "work/nothing-here", tmp_path / "y")


def test_a_failing_official_run_names_its_output(tmp_path):
    repo = fake_official_repo(tmp_path / "ProbeGen", main="import sys\nprint('CUDA out of luck')\nsys.exit(3)\n")
    root = fake_root(tmp_path / "project")
    with pytest.raises(ProbegenError, match=r"exit 3: CUDA out of luck"):
        bo.official_vs_ours(repo, root=root, epochs=1, eval_every=1, seeds=(1,))


def test_our_stage_that_writes_no_metrics_is_named(tmp_path):
    repo = fake_official_repo(tmp_path / "ProbeGen")
    root = fake_root(tmp_path / "project")
    (root / "stages/train.py").write_text("print('trained nothing')\n")
    with pytest.raises(ProbegenError, match=r"models/digits_inr/probegen/seed-1.json: not written by"):
        bo.official_vs_ours(repo, root=root, epochs=1, batch_size=2, eval_every=2, seeds=(1,))


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL_MIRROR.is_dir() or not (ROOT / "data/zoos/digits_inr/meta.csv").is_file(),
                    reason="needs the official ProbeGen mirror and this checkout's packed digits_inr zoo")
def test_the_real_official_code_for_one_epoch(tmp_path):
    # 1,258 training models, batch 32: 40 steps; evaluations at 10, 20, 30 (none at the last step)
    result = bo.official_vs_ours(OFFICIAL_MIRROR, root=ROOT, epochs=1, eval_every=10, seeds=(1,),
                                 keep=tmp_path, timeout=1800)
    official, ours = result["official"]["per_seed"][1], result["ours"]["per_seed"][1]
    assert (official["evals"], official["last_step"]) == (3, 30)
    assert official["best_step"] in (10, 20, 30)
    for acc in (official["test_acc"], official["last_test_acc"], ours["test"]):
        assert 0.0 <= acc <= 1.0 and acc * 359 == pytest.approx(round(acc * 359), abs=1e-3)  # k / 359 test models
    assert result["official"]["seconds"] > 0 and result["ours"]["seconds"] > 0
