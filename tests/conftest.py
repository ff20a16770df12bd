"""Shared test helpers: a temporary DVC project made from this checkout, with tiny params."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from probegen.runtime import keep_freed_memory

keep_freed_memory()  # the stages' memory policy, so that in-process training runs as fast as a stage
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one torch thread each (read when torch loads, after this), inherited by
    # the stage processes they start, instead of every worker's threads contending for every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` of both embedded zoos takes about a minute on 2 cores.
TINY = {
    "num_probes": 4,
    "seeds": [0],
    "zoo": {"digits_inr": {"fetch": {"num_models": 60, "steps": 60}},
            "digits_cnn": {"fetch": {"num_runs": 24, "epochs": 2}}},
    "dead_leaves": {"pool_size": 16},
    "train": {"digits_inr": {"epochs": 2, "eval_every": 5}, "digits_cnn": {"epochs": 2, "eval_every": 5}},
    "method": {**{m: {"hidden": 32, "layers": 3} for m in ("probegen", "vanilla", "synthetic", "mlp", "statnn")},
               # the graph networks at a toy size, without their embedded-zoo settings (per_zoo)
               "ng_gnn": {"hidden": 8, "layers": 1, "fourier_dim": 8, "per_zoo": None},
               "ng_t": {"hidden": 8, "layers": 1, "d_edge": 4, "d_attn_hid": 8, "d_node_hid": 8, "d_edge_hid": 8,
                        "heads": 2, "d_out_hid": 8, "fourier_dim": 8, "per_zoo": None}},
    "induction": {"seeds": [0], "steps": 30, "n_pairs": 16, "n_fit_pairs": 16, "greedy_rounds": 1, "n_boot": 20},
    "localize": {"n_pairs": 16, "n_boot": 20, "top_probes": 2},
}


def deep_update(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def tiny_params(**overrides):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_update(deep_update(params, TINY), overrides)


def run(cmd, cwd, check=True, env=None):
    """Run a command with this interpreter's venv first on PATH; return the CompletedProcess."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
                "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(path, params):
    """A git + DVC project holding this checkout's pipeline code and the given params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "pyproject.toml", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    for name in ("stages", "probegen"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (path / ".gitignore").write_text("__pycache__/\n")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q && dvc init -q && git add -A && git commit -qm init", path)
    return path


@pytest.fixture
def project(tmp_path):
    return lambda params=None: make_project(tmp_path / "project", params or tiny_params())
