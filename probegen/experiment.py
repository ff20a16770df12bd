"""One training stage: a (zoo, method) pair, every seed, from params to its outputs.

    models/<zoo>/<method>/seed-<s>.pt      the best-validation state, the resolved method config and the test
                                           predictions (probegen.saved: tensors and plain values only)
    models/<zoo>/<method>/seed-<s>.json    the run's metrics: test at the best validation step, val, best
                                           step, trainable parameters, FLOPs per model, split sizes
    models/<zoo>/<method>/live/seed-<s>/   training curves, written while it trains (DVCLive): train/loss.tsv
                                           and val/<metric>.tsv, named by the metric (accuracy, kendall_tau)
    models/<zoo>/<method>/skipped.json     instead of the above when the method is not defined for the zoo's
                                           architecture family (e.g. DWSNets on CNNs), with the reason

Timings are not results: they go to .probegen/logs/<zoo>-<method>.json, so the same inputs give the same
output bytes. A run checkpoints itself under .probegen/checkpoints/ (outside the stage's outputs, which DVC
removes before rerunning a stage) and a rerun after a kill resumes from there.

Probing methods read num_probes and the Dead-Leaves pool; weight-space methods read neither, so their DVC
stages do not depend on them.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from probegen import config
from probegen.errors import ProbegenError
from probegen.io import write_json
from probegen.methods import METHODS, available, build_method
from probegen.training import Checkpoint, train_seeds
from probegen.zoo.packed import load_packed
from probegen.zoo.splits import load_split

DEAD_LEAVES = Path("data/probes/dead_leaves.npy")
STATE = Path(".probegen")  # checkpoints and logs: git- and dvc-ignored, never a stage output


def run_dir(zoo, method, root="."):
    return Path(root) / f"models/{zoo}/{method}"


def run_paths(zoo, method, seed, root="."):
    """Where one seed's files live (see the module docstring)."""
    d = run_dir(zoo, method, root)
    return {"model": d / f"seed-{seed}.pt", "metrics": d / f"seed-{seed}.json", "live": d / f"live/seed-{seed}"}


def run(params, zoo_name, method_name, root=".", progress=True):
    """Train every seed of (zoo, method) and write their outputs. Returns the metrics of each seed."""
    root = Path(root)
    if method_name not in METHODS:
        raise ProbegenError(f"unknown method {method_name!r}; known: {available()}")
    method_cfg = config.method_config(params, method_name, zoo_name)  # its per_zoo overrides applied
    schedule = config.train_config(params, zoo_name, method_name)
    seeds = config.seeds(params)
    reason = METHODS[method_name].why_unsupported(config.family_of(params, zoo_name))
    if reason:
        write_json(run_dir(zoo_name, method_name, root) / "skipped.json",
                   {"zoo": zoo_name, "method": method_name, "skipped": reason})
        return []
    probing = METHODS[method_name].kind == "probe"
    num_probes = config.num_probes(params) if probing else None
    pool_path = root / DEAD_LEAVES
    pool = np.load(pool_path, mmap_mode="r") if probing and pool_path.exists() else None

    zoo = load_packed(root / f"data/zoos/{zoo_name}")
    split = load_split(root / f"data/splits/{zoo_name}.json", num_models=len(zoo))
    methods = [build_method(method_name, zoo, method_cfg, num_probes=num_probes, probe_pool=pool, seed=s)
               for s in seeds]
    curves = Curves(zoo_name, method_name, zoo.task, root)
    checkpoint = _checkpoint(params, root, zoo_name, method_name, run_key(params, root, zoo_name, method_name))
    results = train_seeds(methods, zoo, split, seeds=seeds, epochs=schedule.epochs,
                          batch_size=schedule.batch_size, lr=method_cfg["lr"], optimizer=method_cfg["optimizer"],
                          weight_decay=method_cfg.get("weight_decay", 0.0), grad_clip=method_cfg.get("grad_clip"),
                          eval_every=schedule.eval_every, device=config.device(params), progress=progress,
                          checkpoint=checkpoint, on_eval=curves.log)
    curves.end()
    out = []
    for seed, result in zip(seeds, results):
        metrics = {**result.metrics, "zoo": zoo_name, "method": method_name, "num_probes": num_probes}
        save_outputs(run_paths(zoo_name, method_name, seed, root), result, metrics, method_cfg)
        out.append(metrics)
    write_json(root / STATE / f"logs/{zoo_name}-{method_name}.json",
               {"train_seconds": {str(s): r.seconds for s, r in zip(seeds, results)}})
    return out


def skip_reason(zoo, method, root="."):
    """Why run() skipped (zoo, method), from its skipped.json."""
    from probegen.io import read_json

    return read_json(run_dir(zoo, method, root) / "skipped.json")["skipped"]


def save_outputs(paths, result, metrics, method_cfg):
    """Write one seed's model and metrics; each appears whole or not at all. The model file is written by
    probegen.saved (tensors and plain values only: it loads with weights_only=True)."""
    from probegen import saved

    saved.save_run(paths["model"], zoo=metrics["zoo"], method=metrics["method"], seed=metrics["seed"],
                   method_cfg=method_cfg, num_probes=metrics["num_probes"], state_dict=result.state_dict,
                   test_pred=result.test_pred, test_target=result.test_target, metrics=metrics)
    write_json(paths["metrics"], metrics)


class Curves:
    """Training curves through DVCLive, one Live per seed: train/loss and val/<metric name> at every
    validation step, written as the run goes (DVC shows them live during `dvc exp run`)."""

    def __init__(self, zoo, method, task, root):
        self.zoo, self.method, self.root, self.lives = zoo, method, root, {}
        self.metric = "kendall_tau" if task == "regression" else "accuracy"

    def log(self, seed, row):
        if seed not in self.lives:
            from dvclive import Live  # imported here: only training stages need it

            path = run_paths(self.zoo, self.method, seed, self.root)["live"]
            self.lives[seed] = Live(str(path), dvcyaml=None, save_dvc_exp=False, report=None)
        live = self.lives[seed]
        live.step = int(row["step"])
        live.log_metric("train/loss", row["train_loss"])
        live.log_metric(f"val/{self.metric}", row["val_metric"])
        live.log_metric("lr", row["lr"], plot=False)
        live.make_summary()

    def end(self):
        for live in self.lives.values():
            live.end()


# ------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(params, root, zoo, method, key):
    every_steps, every_seconds = config.checkpoint_config(params)
    if not (every_steps or every_seconds):
        return None
    return Checkpoint(root / STATE / f"checkpoints/{zoo}-{method}.pt", key, every_steps, every_seconds,
                      on_corrupt=lambda message: print(f"warning: {message}", file=sys.stderr))


def run_key(params, root, zoo, method):
    """A hash of everything a (zoo, method) run depends on: its params, the packed zoo, the split, the probe
    pool and the code. A checkpoint is resumed only by a run with the same key."""
    parts = {"method": config.method_config(params, method, zoo), "seeds": config.seeds(params),
             "schedule": vars(config.train_config(params, zoo, method)), "device": config.device(params),
             "num_probes": config.num_probes(params) if METHODS[method].kind == "probe" else None}
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    files = [root / f"data/zoos/{zoo}/{n}" for n in ("spec.json", "offsets.npy", "labels.npy", "weights.npy")]
    files += [root / f"data/splits/{zoo}.json", root / DEAD_LEAVES]
    files += sorted(Path(__file__).parent.rglob("*.py"))  # the code that trains
    for path in files:
        if path.exists():
            h.update(path.name.encode())
            _hash_file(h, path)
    return h.hexdigest()


def _hash_file(h, path, chunk=1 << 24, whole_below=1 << 28):
    """Feed a file to the hash: whole when small; else its size and 16 evenly spaced 16 MB blocks (a packed
    Wild Park zoo is 7.6 GB, and the key only has to tell runs apart, not prove integrity)."""
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= whole_below:
            while block := f.read(chunk):
                h.update(block)
            return
        for i in range(16):
            f.seek(i * (size - chunk) // 15)
            h.update(f.read(chunk))
