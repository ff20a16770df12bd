"""Figures for a paper, drawn from the aggregated runs; each is saved as PNG and PDF.

    methods          test metric per method and zoo: mean with an error bar of one std over seeds, the
                     seeds as dots, the axis from 0 (accuracy and tau are not stretched), chance for
                     classification
    flops_vs_metric  test metric against forward FLOPs per zoo model (log x): the paper's cost comparison
    curves_<zoo>     training loss and validation metric against epochs, every method on one plot (mean over
                     seeds, min-max band)
    predicted_vs_true_<zoo>, probes_<zoo>   a regression zoo's predictions; the learned probes
    metric_vs_k      test metric against the number of probes K, over experiments (probegen compare-k)
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRIC_LABEL = {"accuracy": "test accuracy", "kendall_tau": "test Kendall's tau"}
VAL_LABEL = {"accuracy": "validation accuracy", "kendall_tau": "validation Kendall's tau"}
ERROR_BAR = "mean ± std over seeds; dots: seeds"


def save(fig, base):
    """base: a path without suffix -> base.png and base.pdf."""
    fig.tight_layout()
    fig.savefig(f"{base}.png", dpi=130)
    fig.savefig(f"{base}.pdf", metadata={"CreationDate": None})  # no timestamp: the same run, the same bytes
    plt.close(fig)


def _color(method, methods):
    return "C0" if method == "probegen" else f"C{1 + sorted(methods).index(method) % 9}"


def plot_methods(summary, base, num_classes):
    """summary {zoo: {method: row}} -> one panel per zoo."""
    fig, axes = plt.subplots(1, len(summary), figsize=(0.55 * _most_methods(summary) * len(summary) + 2, 3.8),
                             squeeze=False)
    for ax, (zoo, rows) in zip(axes[0], summary.items()):
        ran = {m: r for m, r in rows.items() if not r.get("skipped")}
        names = list(ran)
        x = np.arange(len(names))
        means = [ran[m]["test_mean"] for m in names]
        ax.bar(x, means, yerr=[ran[m]["test_std"] for m in names], capsize=3, width=0.6,
               color=[_color(m, names) for m in names], alpha=0.85)
        for i, m in enumerate(names):
            tests = ran[m]["tests"]
            ax.scatter(np.full(len(tests), i) + np.linspace(-0.12, 0.12, len(tests)), tests, s=9, c="k", zorder=3)
        metric = next(iter(ran.values()))["metric"] if ran else "accuracy"
        low = min([0.0] + [min(r["tests"]) for r in ran.values()])
        ax.set_ylim(low, 1.0)
        if metric == "accuracy" and num_classes.get(zoo):
            ax.axhline(1 / num_classes[zoo], color="k", ls=":", lw=1, label=f"chance (1/{num_classes[zoo]})")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(x, names, rotation=35, ha="right")
        ax.set_ylabel(METRIC_LABEL[metric])
        skipped = [m for m, r in rows.items() if r.get("skipped")]
        ax.set_title(f"{zoo}" + (f"  (n/a: {', '.join(skipped)})" if skipped else ""), fontsize=10)
    fig.suptitle(f"test metric at the best validation step; {ERROR_BAR}", fontsize=8)
    save(fig, base)


def _most_methods(summary):
    return max(len(rows) for rows in summary.values())


def plot_flops_vs_metric(summary, base):
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.8), squeeze=False)
    for ax, (zoo, rows) in zip(axes[0], summary.items()):
        ran = {m: r for m, r in rows.items() if not r.get("skipped")}
        for m, r in ran.items():
            ax.errorbar(r["flops_per_model"], r["test_mean"], yerr=r["test_std"], fmt="o", capsize=3,
                        color=_color(m, list(ran)), label=m)
            ax.annotate(m, (r["flops_per_model"], r["test_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        metric = next(iter(ran.values()))["metric"] if ran else "accuracy"
        ax.set_ylim(min([0.0] + [r["test_mean"] - r["test_std"] for r in ran.values()]), 1.0)
        ax.set_xlabel("forward FLOPs per zoo model (log scale)")
        ax.set_ylabel(METRIC_LABEL[metric])
        ax.set_title(zoo, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"cost vs result; {ERROR_BAR.split(';')[0]}", fontsize=8)
    save(fig, base)


def plot_curves(zoo, curves, metric, base):
    """curves {method: [DataFrame per seed with step, epoch, train_loss, val_metric]} -> loss and val panels."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, runs in curves.items():
        color = _color(m, list(curves))
        for ax, column in ((ax_loss, "train_loss"), (ax_val, "val_metric")):
            epochs = runs[0]["epoch"].to_numpy()
            values = np.stack([r[column].to_numpy()[:len(epochs)] for r in runs if len(r) >= len(epochs)])
            ax.plot(epochs, values.mean(0), color=color, label=m, lw=1.4)
            ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (mean since the last validation)")
    ax_val.set_ylabel(VAL_LABEL[metric])
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{zoo}: training curves, mean over seeds (band: min to max)", fontsize=9)
    save(fig, base)


def plot_predicted_vs_true(pred, target, title, base):
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(target, pred, s=6, alpha=0.5)
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("true test accuracy of the zoo model")
    ax.set_ylabel("predicted")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    save(fig, base)


def plot_inr_probes(probes, mean_image, title, base):
    """INR probes are 2-D coordinates: scatter them over the zoo's mean image (its INRs rendered)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    # grid_coords entry k is (x = lin[k % side], y = lin[k // side]): rows of the image are y, downwards.
    ax.imshow(mean_image, cmap="gray", extent=(-1, 1, 1, -1))
    ax.scatter(probes[:, 0], probes[:, 1], s=10, c="C1")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(1.5, -1.5)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=9)
    save(fig, base)


def plot_image_probes(probes, title, base, max_show=64):
    """Image probes (K, C, H, W) as a grid, each scaled to its own range."""
    k = min(len(probes), max_show)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            img = np.transpose(probes[i], (1, 2, 0))
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
    fig.suptitle(title, fontsize=9)
    save(fig, base)


def plot_metric_vs_k(points, base):
    """points {zoo: {method: [(K, mean, std, metric name)]}} -> one panel per zoo, a line per probing method."""
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.8), squeeze=False)
    for ax, (zoo, by_method) in zip(axes[0], points.items()):
        metric = "accuracy"
        for m, pts in by_method.items():
            pts = sorted(pts)
            ks, means, stds = (np.array(v) for v in zip(*[(k, mean, std) for k, mean, std, _ in pts]))
            metric = pts[0][3]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=m, color=_color(m, list(by_method)))
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("number of probes K")
        ax.set_ylabel(METRIC_LABEL[metric])
        ax.set_title(zoo, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(ERROR_BAR.split(";")[0], fontsize=8)
    save(fig, base)
