"""The official ProbeGen code (github.com/jonkahana/ProbeGen) against this project's training, as whole
processes, on the same zoo, split, seeds and schedule (printed, never asserted):

    python -m probegen.bench_official /path/to/ProbeGen      a clone, or its git dir (a bare mirror)

Everything the official code needs is written to a temporary folder; its files are run, never copied into
this project and never edited:

    <tmp>/official/           a checkout of main.py, data.py, ProbeGen.py when given a git dir
    <tmp>/official_run/       its working folder (main.py uses paths relative to the cwd):
        experiments/inr_classification/dataset/mnist_splits.json   our split in its format {split: {path, label}}
        experiments/inr_classification/dataset/<zoo>  -> <root>/data/raw/<zoo>  (the same checkpoints)
        stubs/torchvision/    ProbeGen.py imports torchvision at the top (only its Dead-Leaves probes use
                              it) and torchvision has no CPU build here: a module that refuses any use
        experiments/mnist_inr/runs/<exp>/log.csv                   what it writes: val/test every eval_every
    <tmp>/ours/               params.yaml (the schedule above, device cpu) and data/ -> <root>/data/...;
                              `python -m stages.train <zoo> probegen` writes models/<zoo>/probegen/seed-<s>.json

It is run as their script runs it (scripts/main_results/mnist_inr__ProbeGen_128.sh: dataset mnist_inr, gen_type
linear_2_no_acts, d_hid 256, n_layers 6, lr 3e-4), on the CPU. Both report the test accuracy at the best
validation step (the first best, as ours keeps it); the official code selects nothing, so its last logged test
accuracy is reported too. Its last evaluation is the last multiple of eval_every, not the end of training.
"""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from probegen.errors import ProbegenError

OFFICIAL_FILES = ("main.py", "data.py", "ProbeGen.py")
OFFICIAL_DATASET = "mnist_inr"  # main.py's INR path: reads dataset/mnist_splits.json, 10 classes, 2-D inputs
TORCHVISION_STUB = '''"""Bench stub: ProbeGen.py imports torchvision at the top but only its Dead-Leaves probes use it."""


def __getattr__(name):
    raise ImportError(f"torchvision.{name}: torchvision is not installed here; this stub only lets ProbeGen.py import")
'''


# ------------------------------------------------------------------------------------------- the official side


def official_checkout(official_repo, dest):
    """The folder holding the official main.py: official_repo itself when it is a work tree, else (a git dir,
    such as a bare mirror) a clone into dest with only the files main.py imports checked out (a mirror may
    lack the large split files, which a full checkout would need)."""
    repo = Path(official_repo)
    if all((repo / name).is_file() for name in OFFICIAL_FILES):
        return repo
    if not ((repo / "HEAD").is_file() and (repo / "objects").is_dir()):
        raise ProbegenError(f"{repo}: neither a ProbeGen work tree ({', '.join(OFFICIAL_FILES)}) nor a git dir")
    for cmd in (["git", "clone", "--quiet", "--no-checkout", str(repo), str(dest)],
                ["git", "-C", str(dest), "checkout", "HEAD", "--", *OFFICIAL_FILES]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProbegenError(f"{repo}: {' '.join(cmd[:3])} failed: {proc.stderr.strip()[-300:]}")
    return Path(dest)


def official_split(root, zoo):
    """Our split of zoo (row indices into the packed zoo) as {split: {path, label}} with paths relative to
    the official dataset folder, where `zoo` links to data/raw/<zoo> (meta.csv's id is relative to it)."""
    packed = Path(root) / "data/zoos" / zoo
    family = json.loads((packed / "spec.json").read_text()).get("family")
    if family != "siren":
        raise ProbegenError(f"{packed}/spec.json: family {family!r}: the official INR path runs SIREN zoos only")
    with open(packed / "meta.csv", newline="") as f:
        ids = [row["id"] for row in csv.DictReader(f)]
    labels = np.load(packed / "labels.npy")
    split = json.loads((Path(root) / f"data/splits/{zoo}.json").read_text())
    if len(ids) != len(labels):
        raise ProbegenError(f"{packed}/meta.csv: {len(ids)} rows but labels.npy has {len(labels)}")
    return {name: {"path": [f"{zoo}/{ids[i]}" for i in split[name]], "label": [int(labels[i]) for i in split[name]]}
            for name in ("train", "val", "test")}


def prepare_official_run(run_dir, root, zoo):
    """The working folder of the official main.py (see the module docstring); returns its PYTHONPATH entry."""
    dataset = Path(run_dir) / "experiments/inr_classification/dataset"
    dataset.mkdir(parents=True)
    (dataset / "mnist_splits.json").write_text(json.dumps(official_split(root, zoo)))
    (dataset / zoo).symlink_to((Path(root) / "data/raw" / zoo).resolve(), target_is_directory=True)
    stub = Path(run_dir) / "stubs/torchvision"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(TORCHVISION_STUB)
    return stub.parent


def official_command(main_py, seed, *, epochs, num_probes, batch_size, eval_every, n_workers):
    """scripts/main_results/mnist_inr__ProbeGen_128.sh with our schedule, on the CPU."""
    return [sys.executable, str(main_py), f"--exp_name=bench_seed_{seed}", f"--seed={seed}",
            f"--dataset={OFFICIAL_DATASET}", f"--n_tokens={num_probes}", "--d_hid=256", "--n_layers=6",
            "--gen_type=linear_2_no_acts", f"--batch_size={batch_size}", "--lr=0.0003", f"--epochs={epochs}",
            f"--eval_every={eval_every}", f"--n_workers={n_workers}", "--device=cpu"]


def parse_official_log(log_csv):
    """Its log.csv (one row per evaluation) -> test at the first best val step, and the last row's test."""
    if not Path(log_csv).is_file():
        raise ProbegenError(f"{log_csv}: not written (it logs only at multiples of eval_every: was training shorter?)")
    with open(log_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_acc") not in (None, "")]
    if not rows:
        raise ProbegenError(f"{log_csv}: no evaluation rows (training shorter than eval_every steps?)")
    vals = [float(r["val_acc"]) for r in rows]
    best = rows[int(np.argmax(vals))]  # argmax: the first of equal values
    return {"test_acc": float(best["test_acc"]), "val_acc": float(best["val_acc"]),
            "best_step": int(float(best["global_step"])), "last_test_acc": float(rows[-1]["test_acc"]),
            "last_step": int(float(rows[-1]["global_step"])), "evals": len(rows)}


def run_official(official_repo, scratch, root, zoo, seeds, schedule, n_workers, timeout):
    """Every seed as its own process (main.py trains one seed); seconds = the sum of their wall times."""
    scratch = Path(scratch)
    main_py = official_checkout(official_repo, scratch / "official") / "main.py"
    run_dir = scratch / "official_run"
    stubs = prepare_official_run(run_dir, root, zoo)
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    per_seed, seconds, cpu_seconds = {}, 0.0, 0.0
    for seed in seeds:
        cmd = official_command(main_py, seed, n_workers=n_workers, **schedule)
        wall, cpu = _timed(cmd, run_dir, env, timeout, run_dir / f"seed-{seed}.log")
        seconds, cpu_seconds = seconds + wall, cpu_seconds + cpu
        per_seed[seed] = parse_official_log(run_dir / f"experiments/{OFFICIAL_DATASET}/runs/bench_seed_{seed}/log.csv")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "n_workers": n_workers,
            **_means(per_seed, ("test_acc", "val_acc", "last_test_acc")), "per_seed": per_seed}


# ------------------------------------------------------------------------------------------------ our side


def ours_params(root, zoo, seeds, schedule):
    """<root>/params.yaml with the benchmark's probes, seeds and schedule, on the CPU like the official run."""
    params = yaml.safe_load((Path(root) / "params.yaml").read_text())
    params.update(num_probes=schedule["num_probes"], seeds=list(seeds), device="cpu")
    params["train"][zoo] = {k: schedule[k] for k in ("epochs", "batch_size", "eval_every")}
    (params["method"]["probegen"].get("schedule") or {}).pop(zoo, None)  # a per-method schedule would win
    return params


def run_ours(scratch, root, zoo, seeds, schedule, timeout):
    """`python -m stages.train <zoo> probegen` (every seed, one process) in a folder holding only params.yaml
    and links to <root>/data; the code imported is <root>'s (PYTHONPATH)."""
    work = Path(scratch) / "ours"
    (work / "data").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(ours_params(root, zoo, seeds, schedule), sort_keys=False))
    for name in ("zoos", "splits", "probes"):
        (work / "data" / name).symlink_to((Path(root) / "data" / name).resolve(), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env["PYTHONPATH"] = str(Path(root).resolve())
    cmd = [sys.executable, "-m", "stages.train", zoo, "probegen"]
    seconds, cpu_seconds = _timed(cmd, work, env, timeout, work / "train.log")
    per_seed = {}
    for seed in seeds:
        path = work / f"models/{zoo}/probegen/seed-{seed}.json"
        if not path.is_file():
            raise ProbegenError(f"{path}: not written by `{' '.join(cmd[1:])}` (see {work / 'train.log'})")
        metrics = json.loads(path.read_text())
        per_seed[seed] = {k: metrics[k] for k in ("test", "val", "best_step")}
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, **_means(per_seed, ("test", "val")), "per_seed": per_seed}


# -------------------------------------------------------------------------------------------- side by side


def official_vs_ours(official_repo, root=".", epochs=30, num_probes=128, batch_size=32, eval_every=100,
                     seeds=(1,), timeout=3600, zoo="digits_inr", n_workers=0, keep=None, rounds=1):
    """Run both on the same zoo, split, seeds and schedule; returns {official, ours, speedup} (see module doc).
    keep: a folder to put the scratch files in (kept), instead of a temporary one (removed).
    rounds: run the pair this many times, which side goes first alternating (the machine's speed drifts);
    the speedups are then the medians of the rounds' ratios, each side's seconds the medians of its runs, and
    `rounds` lists every round's (official s, ours s, ratio). Metrics are from the first round."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ProbegenError(f"bench_official: rounds must be a positive integer, got {rounds!r}")
    schedule = {"epochs": epochs, "num_probes": num_probes, "batch_size": batch_size, "eval_every": eval_every}
    seeds = [int(s) for s in seeds]
    load_before = os.getloadavg()[0]  # wall times on a shared machine mean little without it
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-official-") as tmp:
        for r in range(rounds):
            scratch = (Path(keep) if keep else Path(tmp)) / (f"round-{r}" if rounds > 1 else "")
            scratch.mkdir(parents=True, exist_ok=True)
            run = {}
            for side in ("official", "ours") if r % 2 == 0 else ("ours", "official"):
                run[side] = (run_official(official_repo, scratch, root, zoo, seeds, schedule, n_workers, timeout)
                             if side == "official" else run_ours(scratch, root, zoo, seeds, schedule, timeout))
            runs.append(run)
    official, ours = dict(runs[0]["official"]), dict(runs[0]["ours"])
    for side, out in (("official", official), ("ours", ours)):
        for key in ("seconds", "cpu_seconds"):
            out[key] = float(np.median([run[side][key] for run in runs]))
    ratios = [run["official"]["seconds"] / run["ours"]["seconds"] for run in runs]
    cpu_ratios = [run["official"]["cpu_seconds"] / max(run["ours"]["cpu_seconds"], 1e-9) for run in runs]
    return {"zoo": zoo, "seeds": seeds, **schedule, "official": official, "ours": ours,
            "speedup": float(np.median(ratios)), "cpu_speedup": float(np.median(cpu_ratios)),
            "rounds": [(run["official"]["seconds"], run["ours"]["seconds"], ratio) for run, ratio in zip(runs, ratios)],
            "cpus": os.cpu_count(), "load_avg": [load_before, os.getloadavg()[0]]}


def report_lines(result):
    o, u = result["official"], result["ours"]
    what = (f"{result['zoo']}, K={result['num_probes']}, batch {result['batch_size']}, {result['epochs']} epochs, "
            f"eval every {result['eval_every']}, seeds {result['seeds']}, CPU")
    return [f"ProbeGen, whole processes ({what}):",
            f"  official  {o['seconds']:8.1f} s wall {o['cpu_seconds']:8.1f} s CPU  test {o['test_acc']:.4f} at best "
            f"val {o['val_acc']:.4f} (last eval: test {o['last_test_acc']:.4f}; n_workers {o['n_workers']})",
            f"  ours      {u['seconds']:8.1f} s wall {u['cpu_seconds']:8.1f} s CPU  test {u['test']:.4f} at best "
            f"val {u['val']:.4f}",
            f"  speedup   {result['speedup']:8.2f} x wall {result['cpu_speedup']:6.2f} x CPU   test difference "
            f"(ours - official) {100 * (u['test'] - o['test_acc']):+.2f} points",
            f"  machine   {result['cpus']} CPUs, 1-min load average {result['load_avg'][0]:.1f} before, "
            f"{result['load_avg'][1]:.1f} after",
            "  per seed  test (official / ours): " + ", ".join(
                f"{seed}: {o['per_seed'][seed]['test_acc']:.4f} / {u['per_seed'][seed]['test']:.4f}"
                for seed in result["seeds"])] + ([
            f"  rounds    official / ours s (ratio), medians above: " + ", ".join(
                f"{a:.1f} / {b:.1f} ({a / b:.2f}x)" for a, b, _ in result["rounds"])] if len(result["rounds"]) > 1 else [])


def _timed(cmd, cwd, env, timeout, log_path):
    """(wall seconds, CPU seconds) of one whole process and what it waited for (DataLoader workers); its
    output goes to log_path; a failure names the log's tail. CPU time says more than wall time on a machine
    that others load too (it also counts threads that spin)."""
    cpu_before = _children_cpu()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProbegenError(f"{cmd[1]}: still running after {timeout} s (timeout)") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-5:]
        raise ProbegenError(f"{' '.join(map(str, cmd[1:3]))}: exit {proc.returncode}: {' | '.join(tail)}")
    return seconds, _children_cpu() - cpu_before


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _means(per_seed, keys):
    return {k: float(np.mean([r[k] for r in per_seed.values()])) for k in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", help="the official ProbeGen repository: a clone or its git dir")
    p.add_argument("--root", default=".", help="this project's root (params.yaml, data/)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--n-workers", type=int, default=0, help="the official DataLoader workers (its default: 4)")
    p.add_argument("--keep", help="keep the scratch files in this folder")
    p.add_argument("--rounds", type=int, default=1, help="run the pair this many times, alternating which goes "
                   "first; report the medians")
    args = p.parse_args(argv)
    try:
        result = official_vs_ours(args.official, root=args.root, epochs=args.epochs, seeds=args.seeds,
                                  n_workers=args.n_workers, keep=args.keep, rounds=args.rounds)
    except ProbegenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
