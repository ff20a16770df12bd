"""The test metric against the number of probes K, over the DVC experiments and commits of a project.

One `dvc exp run -S num_probes=<K>` per K leaves one experiment each; `probegen compare-k` reads them all
through `dvc exp show --json` (the workspace, the commits and their experiments) and plots every probing
method's headline (metrics/summary.json: test mean ± std over seeds) against K, one panel per zoo ->
plots/compare/metric_vs_k.{png,pdf}. Where several experiments ran the same K, the first one DVC lists
(the workspace, then the newest) is kept.
"""

import json
import subprocess
from pathlib import Path

from probegen.errors import ProbegenError
from probegen.io import read_json

OUT = "plots/compare/metric_vs_k"


def revisions(exp_show):
    """`dvc exp show --json` -> the data of every revision it lists (commits and their experiments)."""
    for commit in exp_show:
        yield commit.get("data") or {}
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield rev.get("data") or {}


def points_by_k(exp_show):
    """-> {zoo: {method: {K: (mean, std)}}} for the probing methods of each revision."""
    points = {}
    for data in revisions(exp_show):
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        summary = (data.get("metrics") or {}).get("metrics/summary.json", {}).get("data") or {}
        k = params.get("num_probes")
        for zoo in params.get("zoos") or []:
            for method in (params.get("methods") or {}).get("probe") or []:
                row = (summary.get(zoo) or {}).get(method) or {}
                if k is not None and row.get("test") is not None:
                    points.setdefault(zoo, {}).setdefault(method, {}).setdefault(k, (row["test"], row.get("std") or 0.0))
    return points


def compare_k(root="."):
    """Plot every K the project's experiments ran -> (the figure's base path, {zoo: {method: {K: (mean, std)}}})."""
    from probegen import figures

    root = Path(root)
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProbegenError(f"dvc exp show failed in {root}: {proc.stderr.strip().splitlines()[-1:]}")
    points = points_by_k(json.loads(proc.stdout))
    if not any(len(ks) > 1 for by_method in points.values() for ks in by_method.values()):
        raise ProbegenError(f"{root}: the experiments ran one K only; run `dvc exp run -S num_probes=<K>` first")
    details = root / "metrics/details.json"  # each zoo's metric name (accuracy / kendall_tau)
    if not details.exists():
        raise ProbegenError(f"{details}: missing; run `dvc repro` first")
    metric = {zoo: row["metric"] for zoo, rows in read_json(details).items() if zoo in points
              for row in rows.values() if isinstance(row, dict) and "metric" in row}
    (root / OUT).parent.mkdir(parents=True, exist_ok=True)
    series = {zoo: {m: [(k, mean, std, metric[zoo]) for k, (mean, std) in ks.items()] for m, ks in by_method.items()}
              for zoo, by_method in points.items() if zoo in metric}  # zoos of the workspace's details
    figures.plot_metric_vs_k(series, root / OUT)
    return root / OUT, points
