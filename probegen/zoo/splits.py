"""Train / val / test splits of a packed zoo, saved as JSON:

    {"train": [row, ...], "val": [...], "test": [...]}     rows index the packed zoo (weights.npy)

Embedded zoos get a deterministic split (stratified by label for classification). Real zoos use the
official split files of the Neural Graphs / NFN code, matched to the packed zoo through its meta: `id`
(checkpoint path relative to the raw folder) for the INR and Wild Park zoos, `row` (index into the
published weights.npy) and `step` for the Small CNN Zoo.
"""

import json
import random
from pathlib import Path

import numpy as np

from probegen.errors import ProbegenError
from probegen.io import write_json
from probegen.zoo.download import download, url_file_name
from probegen.zoo.packed import load_packed

SPLITS = ("train", "val", "test")
SMALL_CNN_FINAL_STEP = 86  # Small CNN Zoo: the last of the 9 checkpoints of each run
SPLIT_DOWNLOADS = Path("data/downloads/splits")  # official split files, fetched once


# -----------------------------------------------------------------------------
# deterministic split (embedded zoos)

def deterministic_split(labels, *, val=0.1, test=0.2, seed=0, stratify):
    """Split models at random but reproducibly. With stratify, each label gets val/test/train in the
    requested proportions (to within one model per label); the rest is by model."""
    labels = np.asarray(labels)
    n = len(labels)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ProbegenError(f"split: need val, test >= 0 and val + test < 1, got val={val}, test={test}")
    groups = np.unique(labels, return_inverse=True)[1].ravel() if stratify else np.zeros(n, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(groups[order], kind="stable")]  # shuffled within each label, labels contiguous
    g = groups[order]
    counts = np.bincount(g)
    rank = np.arange(n) - (np.cumsum(counts) - counts)[g]
    q = (rank + 0.5) / counts[g]  # where a model sits within its label, in (0, 1)
    which = np.where(q < test, 2, np.where(q < test + val, 1, 0))
    split = {name: np.sort(order[which == i]).tolist() for i, name in enumerate(SPLITS)}
    for name, frac in (("train", 1 - val - test), ("val", val), ("test", test)):
        if frac > 0 and not split[name]:
            raise ProbegenError(f"split: {n} models are too few for a {frac:g} {name} fraction")
    return split


# -----------------------------------------------------------------------------
# official split files (real zoos)

def inr_official_split(split_json, meta, labels=None):
    """{mnist,fmnist}_splits.json: {split: {"path": [...], "label": [...]}}. The paths are the authors'
    (relative or absolute cluster paths); they are matched to meta `id` by their trailing components.
    With `labels` (the packed zoo's), every label in the file is checked against the matched model."""
    data, match = _read_split_json(split_json), _path_matcher(meta["id"], split_json)
    split = {}
    for name in SPLITS:
        entry = _split_entry(data, name, split_json, ("path", "label"))
        rows = [match(p) for p in entry["path"]]
        if labels is not None:
            for path, row, label in zip(entry["path"], rows, entry["label"]):
                if int(label) != int(labels[row]):
                    raise ProbegenError(f"{split_json}: {path} has label {label} there but "
                                        f"{labels[row]} in the packed zoo")
        split[name] = rows
    return _check_disjoint(split, split_json)


def split_file_labels(split_json, ids):
    """{id: label} from an INR split file ({split: {path, label}}), for the models named by `ids` (checkpoint
    paths relative to the raw folder, matched by their trailing components as the split stage matches them).
    Models the file does not list are left out."""
    data, match = _read_split_json(split_json), _path_matcher(ids, split_json)
    ids, labels = list(ids), {}
    for name in SPLITS:
        entry = _split_entry(data, name, split_json, ("path", "label"))
        for path, label in zip(entry["path"], entry["label"]):
            if isinstance(label, bool) or not isinstance(label, int):
                raise ProbegenError(f"{split_json}: {path} has label {label!r}, not an integer class")
            labels[ids[match(path)]] = label
    return labels


def wild_park_official_split(split_json, meta):
    """cnn_park_splits.json: {split: {"path": [...], "score": [...], "step": [...]}}, split by run.
    Paths are matched to meta `id` by their trailing components."""
    data, match = _read_split_json(split_json), _path_matcher(meta["id"], split_json)
    split = {name: [match(p) for p in _split_entry(data, name, split_json, ("path",))["path"]]
             for name in SPLITS}
    return _check_disjoint(split, split_json)


def small_cnn_official_split(order_csv, meta, *, final_step=SMALL_CNN_FINAL_STEP):
    """The NFN / Neural Graphs split of the Small CNN Zoo (NFNZooDataset._split_indices_iid).

    The order file lists weights.npy rows, one per line. The code reads it with
    `pd.read_csv(idcs_file, header=None)`, so its first line (a stray pandas header "0") counts as an
    extra row 0. Rows are taken in that order, only final checkpoints (step == 86) kept; the second half
    is test; the first half is shuffled with random.Random(0) and cut 80/20 into train / val.
    meta: the packed zoo's `row` (index into weights.npy) and `step` columns; it may hold all
    checkpoints or only the final ones.
    """
    order = _read_order(order_csv)
    rows, steps = meta["row"].to_numpy(dtype=np.int64), meta["step"].to_numpy()
    # final_step None: the zoo was packed with each run's last checkpoint, so every row is a final one
    final = np.arange(len(steps)) if final_step is None else np.flatnonzero(steps == final_step)
    if len(final) == 0:
        raise ProbegenError(f"packed zoo: no checkpoints with step == {final_step} to split")
    lookup = np.full(max(order.max(), rows.max()) + 1, -1, dtype=np.int64)
    lookup[rows[final]] = final  # weights.npy row -> packed row, final checkpoints only
    missing = np.setdiff1d(rows[final], order)
    if len(missing):
        raise ProbegenError(f"{order_csv}: row {missing[0]} of the packed zoo (and {len(missing) - 1} more) "
                            f"is not in the order file")
    packed = lookup[order]
    keep = packed >= 0
    kept = packed[keep]
    n = len(kept)
    test_point = int(0.5 * n)
    trainval = list(range(test_point))
    val_point = int(0.8 * len(trainval))
    random.Random(0).shuffle(trainval)  # the local seed the NFN code uses for a consistent train/val cut
    positions = {"train": trainval[:val_point], "val": trainval[val_point:], "test": list(range(test_point, n))}
    # The stray header row 0 is listed twice when it is a final checkpoint. Its first copy (position 0,
    # always in train or val) would put one model in two splits: drop it.
    stray = keep[0] and (order[1:] == order[0]).any()
    split = {name: [int(kept[p]) for p in pos if not (stray and p == 0)] for name, pos in positions.items()}
    return _check_disjoint(split, order_csv)


def _read_order(order_csv):
    path = Path(order_csv)
    if not path.is_file():
        raise ProbegenError(f"{path}: no such split file")
    lines = path.read_text().split()
    try:
        order = np.array([int(x) for x in lines], dtype=np.int64)
    except ValueError:
        bad = next(i for i, x in enumerate(lines) if not x.lstrip("-").isdigit())
        raise ProbegenError(f"{path}: entry {bad + 1} ({lines[bad]!r}) is not a row index") from None
    if len(order) == 0 or order.min() < 0:
        raise ProbegenError(f"{path}: expected one non-negative row index per line")
    # every row once, plus the stray header's extra row 0: anything else is not an order file
    values, counts = np.unique(order[1:], return_counts=True)
    if (counts > 1).any():
        raise ProbegenError(f"{path}: row {values[counts > 1][0]} is listed more than once")
    return order


def _read_split_json(split_json):
    path = Path(split_json)
    if not path.is_file():
        raise ProbegenError(f"{path}: no such split file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProbegenError(f"{path}: not valid JSON ({err})") from None


def _split_entry(data, name, split_json, keys):
    entry = data.get(name) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in keys):
        raise ProbegenError(f"{split_json}: expected {{{name!r}: {{{', '.join(map(repr, keys))}: [...]}}}}")
    if len({len(entry[k]) for k in keys}) > 1:
        raise ProbegenError(f"{split_json}: {name}: the lists {', '.join(keys)} differ in length")
    return entry


def _parts(path):
    return tuple(p for p in str(path).replace("\\", "/").split("/") if p not in ("", "."))


def _path_matcher(ids, split_file):
    """path -> packed row, matching on the shortest tail of path components that tells every packed
    model apart (e.g. `mnist_png_training_2_23089/checkpoints/model_final.pth`). The tails must then
    agree as far as the shorter of the two paths goes, so either prefix (the authors' cluster folder,
    our raw folder) may differ but nothing else."""
    ids = [_parts(i) for i in ids]
    depth = max(len(p) for p in ids)
    for k in range(1, depth + 1):
        table = {p[-k:]: row for row, p in enumerate(ids)}
        if len(table) == len(ids):
            break
    else:
        raise ProbegenError("packed zoo: meta ids are not unique, cannot match a split file to it")

    def match(path):
        parts = _parts(path)
        row = table.get(parts[-k:])
        m = min(len(parts), len(ids[row])) if row is not None else 0
        if row is None or parts[-m:] != ids[row][-m:]:
            raise ProbegenError(f"{split_file}: {path} is not in the packed zoo")
        return row

    return match


def _check_disjoint(split, source):
    seen = {}
    for name in SPLITS:
        for row in split[name]:
            if row in seen:
                raise ProbegenError(f"{source}: model {row} is in both {seen[row]} and {name}")
            seen[row] = name
    return split


# -----------------------------------------------------------------------------
# dispatch, save, load

OFFICIAL = {"inr_official": inr_official_split, "small_cnn_official": small_cnn_official_split,
            "wild_park_official": wild_park_official_split}
KINDS = ("deterministic", *OFFICIAL)


def make_split(kind, zoo, *, split_file=None, val=0.1, test=0.2, seed=0):
    """Split a packed zoo (anything with .labels, .meta, .task) by the named kind."""
    if kind == "deterministic":
        return deterministic_split(zoo.labels, val=val, test=test, seed=seed,
                                   stratify=zoo.task == "classification")
    if kind not in OFFICIAL:
        raise ProbegenError(f"split kind: expected one of {KINDS}, got {kind!r}")
    if split_file is None:
        raise ProbegenError(f"split kind {kind!r} needs an official split file")
    if kind == "inr_official":
        return inr_official_split(split_file, zoo.meta, labels=zoo.labels)
    if kind == "small_cnn_official":  # the checkpoints the packed zoo kept (zoo.<name>.pack.final_step)
        return small_cnn_official_split(split_file, zoo.meta, final_step=zoo.spec.get("final_step", SMALL_CNN_FINAL_STEP))
    return OFFICIAL[kind](split_file, zoo.meta)


def build_split(cfg, packed_dir, out_path, *, cache_dir=SPLIT_DOWNLOADS):
    """The split stage: a packed zoo and its split config (config.SplitConfig) -> the saved split.
    An official split file is fetched from cfg.url (or copied from a local path) and checked against
    cfg.sha256 when pinned. Returns the split sizes."""
    zoo = load_packed(packed_dir)
    split_file = None
    if cfg.kind != "deterministic":
        dest = Path(cache_dir) / f"{Path(packed_dir).name}-{url_file_name(cfg.url)}"
        split_file = download(cfg.url, dest, sha256=cfg.sha256, progress=False)["path"]
    split = make_split(cfg.kind, zoo, split_file=split_file, val=cfg.val, test=cfg.test, seed=cfg.seed)
    save_split(out_path, split)
    return {name: len(split[name]) for name in SPLITS}


def save_split(path, split):
    write_json(path, {name: [int(i) for i in split[name]] for name in SPLITS})


def load_split(path, num_models=None):
    """Read a saved split and check it: the three lists of row indices, disjoint, within the zoo."""
    path = Path(path)
    if not path.is_file():
        raise ProbegenError(f"{path}: missing; run the split stage first")
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ProbegenError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(split, dict) or set(split) != set(SPLITS):
        raise ProbegenError(f"{path}: expected exactly the keys {SPLITS}")
    for name in SPLITS:
        rows = split[name]
        if not isinstance(rows, list) or not all(isinstance(i, int) and i >= 0 for i in rows):
            raise ProbegenError(f"{path}: {name} must be a list of row indices")
        if num_models is not None and any(i >= num_models for i in rows):
            raise ProbegenError(f"{path}: {name} names a row >= {num_models}, the zoo's size")
    return _check_disjoint(split, path)
