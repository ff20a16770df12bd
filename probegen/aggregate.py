"""Aggregate the runs: mean +- std over seeds per zoo x method, and the summary plots.

    metrics/summary.json            {zoo: {method: {test_mean, test_std, val_mean, ..., seeds}}}
    metrics/summary.md              the same as a markdown table
    plots/summary/methods.png       method comparison per zoo (test metric at best val, mean +- std)
    plots/summary/predicted_vs_true_<zoo>.png   regression zoos: ProbeGen's test predictions
    plots/summary/probes_<zoo>.png  the learned ProbeGen probes (INR: over the mean image; CNN: a grid)
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from probegen.errors import ProbegenError  # noqa: E402
from probegen.experiment import output_paths  # noqa: E402
from probegen.io import atomic_dir, atomic_path, read_json, write_json  # noqa: E402

STATS = ("test", "val", "train_seconds")


def collect(zoos, methods, seeds, root="."):
    """{zoo: {method: [metrics dict per seed]}}; a missing run is an error naming its file."""
    runs = {}
    for zoo in zoos:
        for method in methods:
            for seed in seeds:
                path = output_paths(zoo, method, seed, root)["metrics"]
                if not path.exists():
                    raise ProbegenError(f"{path}: missing; run its probe@/weights@ stage first")
                runs.setdefault(zoo, {}).setdefault(method, []).append(read_json(path))
    return runs


def summarize(runs):
    summary = {}
    for zoo, by_method in runs.items():
        for method, seed_runs in by_method.items():
            row = {"metric": seed_runs[0]["metric"], "seeds": [r["seed"] for r in seed_runs],
                   "best_steps": [r["best_step"] for r in seed_runs],
                   "flops_per_model": seed_runs[0]["flops_per_model"],
                   "trainable_params": seed_runs[0]["trainable_params"],
                   "num_probes": seed_runs[0].get("num_probes")}
            for stat in STATS:
                values = np.array([r[stat] for r in seed_runs], dtype=float)
                row[f"{stat}_mean"] = float(values.mean())
                row[f"{stat}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary.setdefault(zoo, {})[method] = row
    return summary


def markdown_table(summary):
    lines = ["| zoo | method | metric | test (mean ± std) | val (mean ± std) | seeds | K | trainable params "
             "| FLOPs / model | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for zoo, by_method in summary.items():
        for method, r in by_method.items():
            lines.append(f"| {zoo} | {method} | {r['metric']} | {r['test_mean']:.4f} ± {r['test_std']:.4f} "
                         f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {','.join(map(str, r['seeds']))} "
                         f"| {r['num_probes'] or '-'} | {r['trainable_params']:,} | {r['flops_per_model']:,} "
                         f"| {r['train_seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def localize_summary(zoos, root="."):
    """The headline numbers of each zoo's localize@ stage (path patching on the ProbeGen predictor)."""
    out = {}
    for zoo in zoos:
        path = Path(root) / f"metrics/localize/{zoo}.json"
        if not path.exists():
            continue
        loc = read_json(path)
        layers = loc["layers"]
        out[zoo] = {"num_probes": loc["num_probes"], "target": loc["target"],
                    "smallest_probe_set": loc["probes"]["smallest_size"],
                    "only_layer_from_reference": {r["layer"]: r["explained"] for r in layers["aligned"]["only"]},
                    "permutation_sanity_max_aue": max(layers["sanity"]["aue_aligned"].values())}
    return out


def localize_table(localized):
    lines = ["| zoo | smallest probe set explaining the target | only layer l from the reference (aligned) "
             "| sanity: max AUE, permuted reference |", "|---|---|---|---|"]
    for zoo, r in localized.items():
        layers = ", ".join(f"{name} {v:.2f}" for name, v in r["only_layer_from_reference"].items())
        lines.append(f"| {zoo} | {r['smallest_probe_set']} of {r['num_probes']} probes ({r['target']:.0%}) "
                     f"| {layers} | {r['permutation_sanity_max_aue']:.2g} |")
    return "\n".join(lines) + "\n"


def plot_methods(summary, path):
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.6), squeeze=False)
    for ax, (zoo, by_method) in zip(axes[0], summary.items()):
        names = list(by_method)
        means = [by_method[m]["test_mean"] for m in names]
        stds = [by_method[m]["test_std"] for m in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=["C0" if m == "probegen" else "C7" for m in names])
        ax.set_title(f"{zoo}: test {by_method[names[0]]['metric']} at best val")
        ax.tick_params(axis="x", rotation=30)
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(means) + 0.05))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predicted_vs_true(zoo, method, seed, path, root="."):
    ckpt = torch.load(output_paths(zoo, method, seed, root)["model"], weights_only=False)
    pred, target, m = ckpt["test_pred"], ckpt["test_target"], ckpt["metrics"]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(target, pred, s=6, alpha=0.5)
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("true test accuracy")
    ax.set_ylabel("predicted")
    ax.set_title(f"{zoo} {method} seed {seed}: tau {m['test']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learned_probes(zoo_name, method, seed, root="."):
    """Rebuild a trained probing method from its checkpoint; return (its probes (K, ...), the packed zoo)."""
    from probegen.methods import build_method
    from probegen.zoo.packed import load_packed

    ckpt = torch.load(output_paths(zoo_name, method, seed, root)["model"], weights_only=False)
    zoo = load_packed(Path(root) / f"data/zoos/{zoo_name}")
    model = build_method(method, zoo, ckpt["method_cfg"], num_probes=ckpt["metrics"]["num_probes"],
                         probe_pool=None, seed=seed)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    with torch.no_grad():
        return model.probes().cpu().numpy(), zoo


def plot_inr_probes(probes, zoo, path, title):
    """INR probes are 2-D coordinates: scatter them over the zoo's mean image (its INRs rendered)."""
    from probegen.patching.probers import mean_inr_image

    fig, ax = plt.subplots(figsize=(4, 4))
    # grid_coords entry k is (x = lin[k % side], y = lin[k // side]): rows of the image are y, downwards.
    ax.imshow(mean_inr_image(zoo), cmap="gray", extent=(-1, 1, 1, -1))
    ax.scatter(probes[:, 0], probes[:, 1], s=10, c="C1")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(1.5, -1.5)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_image_probes(probes, path, title, max_show=64):
    """Image probes (K, C, H, W) in [-1, 1] as a grid."""
    k = min(len(probes), max_show)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            img = np.transpose(probes[i], (1, 2, 0))
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probes(zoo_name, seed, path, root="."):
    probes, zoo = learned_probes(zoo_name, "probegen", seed, root)
    title = f"{zoo_name}: ProbeGen probes (K={len(probes)}, seed {seed})"
    if probes.ndim == 2:
        plot_inr_probes(probes, zoo, path, title)
    else:
        plot_image_probes(probes, path, title)


def aggregate(zoos, methods, seeds, root="."):
    root = Path(root)
    summary = summarize(collect(zoos, methods, seeds, root))
    with atomic_dir(root / "plots/summary") as out:
        plot_methods(summary, out / "methods.png")
        for zoo in zoos:
            if "probegen" not in methods:
                continue
            plot_probes(zoo, seeds[0], out / f"probes_{zoo}.png", root)
            if summary[zoo]["probegen"]["metric"] == "kendall_tau":
                plot_predicted_vs_true(zoo, "probegen", seeds[0], out / f"predicted_vs_true_{zoo}.png", root)
    # The tables last: if a plot fails, nothing of this stage's outputs has changed.
    localized = localize_summary(zoos, root)
    write_json(root / "metrics/summary.json", {**summary, "localize": localized} if localized else summary)
    table = markdown_table(summary)
    if localized:
        table += "\nPath patching on the ProbeGen predictors (metrics/localize/, plots/localize/):\n\n"
        table += localize_table(localized)
    with atomic_path(root / "metrics/summary.md") as tmp:
        tmp.write_text(table)
    return summary
