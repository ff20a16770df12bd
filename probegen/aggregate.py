"""Aggregate the runs: mean +- std over seeds per zoo x method, the headline metrics, tables and figures.

    metrics/summary.json     the headline, what `dvc exp show` and `dvc metrics diff` show: per zoo and
                             method the test metric's mean and std over seeds, and a few localize / induction
                             numbers; flat and short on purpose
    metrics/details.json     everything else per zoo x method (val, per-seed values, best steps, FLOPs, ...)
    metrics/summary.md       the comparison table, and the path-patching headline
    plots/summary/           the figures (probegen/figures.py), PNG and PDF

A (zoo, method) pair that does not apply (models/<zoo>/<method>/skipped.json) is shown as n/a with its reason.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from probegen import figures
from probegen.errors import ProbegenError
from probegen.experiment import run_dir, run_paths
from probegen.io import atomic_dir, atomic_path, read_json, write_json


def collect(zoos, methods, seeds, root="."):
    """{zoo: {method: [metrics per seed] | {"skipped": reason}}}; a missing run is an error naming its file."""
    runs = {}
    for zoo in zoos:
        for method in methods:
            skipped = run_dir(zoo, method, root) / "skipped.json"
            if skipped.exists():
                runs.setdefault(zoo, {})[method] = {"skipped": read_json(skipped)["skipped"]}
                continue
            rows = []
            for seed in seeds:
                path = run_paths(zoo, method, seed, root)["metrics"]
                if not path.exists():
                    raise ProbegenError(f"{path}: missing; run its probe@/weights@{zoo}-{method} stage first")
                rows.append(read_json(path))
            runs.setdefault(zoo, {})[method] = rows
    return runs


def summarize(runs):
    """{zoo: {method: row}}: mean and std (ddof 1) over seeds of test and val, and what the runs share."""
    summary = {}
    for zoo, by_method in runs.items():
        for method, seed_runs in by_method.items():
            if isinstance(seed_runs, dict):
                summary.setdefault(zoo, {})[method] = dict(seed_runs)
                continue
            first = seed_runs[0]
            row = {"metric": first["metric"], "seeds": [r["seed"] for r in seed_runs],
                   "tests": [r["test"] for r in seed_runs], "vals": [r["val"] for r in seed_runs],
                   "best_steps": [r["best_step"] for r in seed_runs], "steps": first["steps"],
                   "epochs": first.get("epochs"), "batch_size": first.get("batch_size"),
                   "flops_per_model": first["flops_per_model"], "trainable_params": first["trainable_params"],
                   "num_probes": first.get("num_probes")}
            for stat in ("test", "val"):
                values = np.array(row[f"{stat}s"], dtype=float)
                row[f"{stat}_mean"] = float(values.mean())
                row[f"{stat}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary.setdefault(zoo, {})[method] = row
    return summary


def headline(summary, localized, induction):
    """The flat, short metrics file: test mean and std per zoo x method, plus a few path-patching numbers."""
    out = {zoo: {m: ({"test": _round(r["test_mean"]), "std": _round(r["test_std"])} if not r.get("skipped")
                     else {"test": None}) for m, r in rows.items()}
           for zoo, rows in summary.items()}
    for zoo, r in localized.items():
        out.setdefault("localize", {})[zoo] = {"probes_for_target": r.get("smallest_probe_set")}
    if induction is not None:
        out["induction"] = induction
    return out


def _round(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def markdown_table(summary):
    lines = ["| zoo | method | metric | test (mean ± std) | val (mean ± std) | seeds | K | trainable params "
             "| FLOPs / model | epochs x batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for zoo, by_method in summary.items():
        for method, r in by_method.items():
            if r.get("skipped"):
                lines.append(f"| {zoo} | {method} | n/a: {r['skipped']} | | | | | | | |")
                continue
            lines.append(f"| {zoo} | {method} | {r['metric']} | {r['test_mean']:.4f} ± {r['test_std']:.4f} "
                         f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {','.join(map(str, r['seeds']))} "
                         f"| {r['num_probes'] or '-'} | {r['trainable_params']:,} | {r['flops_per_model']:,} "
                         f"| {r['epochs']} x {r['batch_size']} |")
    return "\n".join(lines) + "\n"


def localize_summary(zoos, root="."):
    """The headline numbers of each zoo's localize@ stage (path patching on its prober)."""
    out = {}
    for zoo in zoos:
        path = Path(root) / f"metrics/localize/{zoo}.json"
        if not path.exists():
            continue
        loc = read_json(path)
        if loc.get("skipped"):
            out[zoo] = {"skipped": loc["skipped"]}
            continue
        layers = loc["layers"]
        out[zoo] = {"method": loc.get("method", "probegen"), "num_probes": loc["num_probes"],
                    "target": loc["target"], "smallest_probe_set": loc["probes"]["smallest_size"],
                    "only_layer_from_reference": {r["layer"]: r["explained"] for r in layers["aligned"]["only"]},
                    "permutation_sanity_max_aue": max(layers["sanity"]["aue_aligned"].values())}
    return out


def localize_table(localized):
    lines = ["| zoo | prober | smallest probe set explaining the target | only layer l from the reference "
             "(aligned) | sanity: max AUE, permuted reference |", "|---|---|---|---|---|"]
    for zoo, r in localized.items():
        if r.get("skipped"):
            lines.append(f"| {zoo} | - | skipped: {r['skipped']} | | |")
            continue
        layers = ", ".join(f"{name} {v:.2f}" for name, v in r["only_layer_from_reference"].items() if v is not None)
        lines.append(f"| {zoo} | {r['method']} | {r['smallest_probe_set']} of {r['num_probes']} probes "
                     f"({r['target']:.0%}) | {layers} | {r['permutation_sanity_max_aue']:.2g} |")
    return "\n".join(lines) + "\n"


def induction_headline(root="."):
    path = Path(root) / "metrics/induction.json"
    if not path.exists():
        return None
    result = read_json(path)
    score = result["mean"]["induction"][result["config"]["metric"]]  # None: undefined for some seed
    return {"explained": None if score is None else _round(score["explained"])}


# ---------------------------------------------------------------------------------------------- figures


def curves(zoo, method, row, root="."):
    """Per seed, the training curve from the run's DVCLive files: step, epoch, train_loss, val_metric."""
    out = []
    for seed in row["seeds"]:
        live = run_paths(zoo, method, seed, root)["live"] / "plots/metrics"
        loss = pd.read_csv(live / "train/loss.tsv", sep="\t")
        val = pd.read_csv(live / f"val/{row['metric']}.tsv", sep="\t")
        df = loss.merge(val, on="step").rename(columns={"loss": "train_loss", row["metric"]: "val_metric"})
        df["epoch"] = df["step"] * row["epochs"] / row["steps"]
        out.append(df)
    return out


def draw(summary, zoos, root, out):
    """Every figure of plots/summary/ into the folder `out`."""
    from probegen.zoo.packed import load_packed

    zoo_data = {zoo: load_packed(Path(root) / f"data/zoos/{zoo}") for zoo in zoos}
    num_classes = {z: (d.num_classes if d.task == "classification" else None) for z, d in zoo_data.items()}
    figures.plot_methods(summary, out / "methods", num_classes)
    figures.plot_flops_vs_metric(summary, out / "flops_vs_metric")
    for zoo, rows in summary.items():
        ran = {m: r for m, r in rows.items() if not r.get("skipped")}
        if ran:
            metric = next(iter(ran.values()))["metric"]
            figures.plot_curves(zoo, {m: curves(zoo, m, r, root) for m, r in ran.items()}, metric,
                                out / f"curves_{zoo}")
        if "probegen" in ran:
            _probegen_figures(zoo, ran["probegen"], zoo_data[zoo], root, out)


def _probegen_figures(zoo_name, row, zoo, root, out):
    """The learned probes of ProbeGen's first seed, and (regression zoos) its test predictions."""
    import torch

    from probegen import saved
    from probegen.patching.probers import mean_inr_image

    seed = row["seeds"][0]
    method, _, run = saved.load_trained(run_paths(zoo_name, "probegen", seed, root)["model"], root,
                                        zoo=zoo_name, method="probegen", seed=seed)
    with torch.no_grad():
        probes = method.probes().cpu().numpy()
    title = f"{zoo_name}: ProbeGen probes (K={len(probes)}, seed {seed})"
    if probes.ndim == 2:
        figures.plot_inr_probes(probes, mean_inr_image(zoo), title, out / f"probes_{zoo_name}")
    else:
        figures.plot_image_probes(probes, title, out / f"probes_{zoo_name}")
    if row["metric"] == "kendall_tau":
        figures.plot_predicted_vs_true(run.test_pred, run.test_target,
                                       f"{zoo_name} ProbeGen seed {seed}: tau {run.metrics['test']:.3f}",
                                       out / f"predicted_vs_true_{zoo_name}")


# ------------------------------------------------------------------------------------------------ stage


def aggregate(zoos, methods, seeds, root="."):
    root = Path(root)
    summary = summarize(collect(zoos, methods, seeds, root))
    with atomic_dir(root / "plots/summary") as out:
        draw(summary, zoos, root, out)
    # The tables last: if a figure fails, nothing of this stage's outputs has changed.
    localized = localize_summary(zoos, root)
    write_json(root / "metrics/details.json", {**summary, "localize": localized})
    write_json(root / "metrics/summary.json", headline(summary, localized, induction_headline(root)))
    table = markdown_table(summary)
    if localized:
        table += "\nPath patching on the probers (metrics/localize/, plots/localize/):\n\n" + localize_table(localized)
    with atomic_path(root / "metrics/summary.md") as tmp:
        tmp.write_text(table)
    return summary
