"""One (zoo, method, seed) training run, from params to its three outputs:

    models/<zoo>/<method>-<seed>.pt       best-val state dict + the run's metrics + test predictions
    metrics/<zoo>/<method>-<seed>.json    test/val metric at the best val step, timing, params, FLOPs
    plots/<zoo>/<method>-<seed>.csv       the training curve (step, train_loss, val_metric, lr)

Probing methods read num_probes and the Dead-Leaves pool; weight-space methods read neither, so their
DVC stages do not depend on them.
"""

from pathlib import Path

import numpy as np
import torch

from probegen import config
from probegen.io import atomic_path, read_json, write_json
from probegen.methods import METHODS, build_method
from probegen.train import train
from probegen.zoo.packed import load_packed
from probegen.errors import ProbegenError

DEAD_LEAVES = Path("data/probes/dead_leaves.npy")


def output_paths(zoo, method, seed, root="."):
    root = Path(root)
    return {"model": root / f"models/{zoo}/{method}-{seed}.pt",
            "metrics": root / f"metrics/{zoo}/{method}-{seed}.json",
            "curve": root / f"plots/{zoo}/{method}-{seed}.csv"}


def run(params, zoo_name, method_name, seed, progress=True):
    if method_name not in METHODS:
        raise ProbegenError(f"unknown method {method_name!r}; known: {sorted(METHODS)}")
    kind = METHODS[method_name].kind
    method_cfg = config.method_config(params, method_name)
    train_cfg = config.train_config(params, zoo_name)
    device = config.device(params)
    num_probes = config.num_probes(params) if kind == "probe" else None
    pool = np.load(DEAD_LEAVES, mmap_mode="r") if kind == "probe" and DEAD_LEAVES.exists() else None

    zoo = load_packed(f"data/zoos/{zoo_name}")
    split = read_json(f"data/splits/{zoo_name}.json")
    torch.manual_seed(seed)
    method = build_method(method_name, zoo, method_cfg, num_probes=num_probes, probe_pool=pool, seed=seed)
    result = train(method, zoo, split, epochs=train_cfg.epochs, batch_size=train_cfg.batch_size,
                   lr=method_cfg["lr"], optimizer=method_cfg["optimizer"],
                   weight_decay=method_cfg.get("weight_decay", 0.0), grad_clip=method_cfg.get("grad_clip"),
                   eval_every=train_cfg.eval_every, seed=seed, device=device, progress=progress)
    metrics = {**result.metrics, "zoo": zoo_name, "method": method_name, "num_probes": num_probes}
    save_outputs(output_paths(zoo_name, method_name, seed), result, metrics, method_cfg)
    return metrics


def save_outputs(paths, result, metrics, method_cfg):
    """Write model, metrics and curve; each appears whole or not at all."""
    with atomic_path(paths["model"]) as tmp:
        torch.save({"state_dict": result.state_dict, "metrics": metrics, "method_cfg": method_cfg,
                    "test_pred": np.asarray(result.test_pred), "test_target": np.asarray(result.test_target)},
                   tmp)
    with atomic_path(paths["curve"]) as tmp:
        result.curve.to_csv(tmp, index=False)
    write_json(paths["metrics"], metrics)
