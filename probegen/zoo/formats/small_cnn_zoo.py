"""The Small CNN Zoo (Unterthiner et al. 2020, google-research/dnn_predict_accuracy): reader and writer.

    <raw_dir>/weights.npy      float32 [rows, 4970]: one row per checkpoint (the CIFAR10 zoo: 30k runs x
                               9 checkpoints = 270,000 rows, 5.4 GB), TensorFlow layout
    <raw_dir>/metrics.csv.gz   one row per weights row: config.* hyper-parameters, modeldir, step (the
                               epoch of the checkpoint: 0, 1, 2, 3, 20, 40, 60, 80, 86), test_accuracy, ...
    <raw_dir>/layout.csv       varname,start_idx,end_idx,shape: where each Keras variable sits in a row

Per layer the bias comes before the kernel (conv1 bias [0,16), kernel [16,160) ... dense kernel
[4810,4970)); conv kernels are (H, W, in, out), the dense kernel (in, out). `shape` is a Python tuple
literal, "(3, 3, 1, 16)", as the NFN / Neural Graphs readers parse it.

pack() keeps the final checkpoints (step == final_step) and writes them in the small_cnn family's PyTorch
layout (probegen/nets/small_cnn.py); the label is test_accuracy. weights.npy is opened memory-mapped (its
header and size are checked, nothing is loaded) and the kept rows are copied in chunks, so packing the
5.4 GB file never holds a second copy of it in memory.
"""

import ast
import gzip
import json
import math
import re
import resource
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from probegen.errors import ProbegenError
from probegen.io import atomic_dir, read_json
from probegen.nets import small_cnn
from probegen.zoo.packed import PackedWriter

ARCH = small_cnn.zoo_arch("relu")  # the published architecture (activation aside)
NUM_PARAMS = sum(math.prod(shape) for _, shape in small_cnn.param_shapes(ARCH))  # 4,970
FILES = ("weights.npy", "metrics.csv.gz", "layout.csv")
LAYOUT_COLUMNS = ("varname", "start_idx", "end_idx", "shape")
# What pack() reads. The published file has more (the README's list): config.b_init, config.dataset,
# config.dnn_architecture, config.epochs, config.epochs_between_checkpoints, config.num_layers,
# config.num_units, config.random_seed, test_loss, train_loss.
REQUIRED_METRICS = ("config.activation", "config.dropout", "config.init_std", "config.l2reg",
                    "config.learning_rate", "config.optimizer", "config.train_fraction", "config.w_init",
                    "modeldir", "step", "test_accuracy", "train_accuracy")
SPEC = {"family": "small_cnn", "task": "regression", "format": "small_cnn_zoo"}
CHUNK_ROWS = 2048  # 40 MB of weights per chunk
# Keras names: sequential/conv2d/kernel:0, sequential/conv2d_1/bias:0, ..., sequential/dense/kernel:0
VARNAME = re.compile(r"(?:.*/)?(conv2d|dense)(?:_(\d+))?/(kernel|bias):0")


# -----------------------------------------------------------------------------
# layout: TensorFlow columns <-> PyTorch columns

def tf_layout(arch=ARCH):
    """The published layout.csv of an architecture, as a DataFrame."""
    shapes = dict(small_cnn.param_shapes(arch))
    rows, start = [], 0
    names = [f"conv2d{'' if i == 0 else f'_{i}'}" for i in range(len(arch["channels"]))] + ["dense"]
    modules = [f"convs.{i}" for i in range(len(arch["channels"]))] + ["fc"]
    for name, module in zip(names, modules):
        for kind, param in (("bias", "bias"), ("kernel", "weight")):
            shape = tf_shape(shapes[f"{module}.{param}"])
            size = math.prod(shape)
            rows.append({"varname": f"sequential/{name}/{kind}:0", "start_idx": start,
                         "end_idx": start + size, "shape": str(shape)})
            start += size
    return pd.DataFrame(rows, columns=list(LAYOUT_COLUMNS))


def tf_shape(pt_shape):
    if len(pt_shape) == 4:  # conv (out, in, H, W) -> (H, W, in, out)
        return (pt_shape[2], pt_shape[3], pt_shape[1], pt_shape[0])
    if len(pt_shape) == 2:  # dense (out, in) -> (in, out)
        return (pt_shape[1], pt_shape[0])
    return tuple(pt_shape)


def layout_permutation(layout, arch=ARCH, source="layout.csv"):
    """The column permutation perm with rows_pt = rows_tf[:, perm], derived from a layout table.

    Every layout row is checked against the architecture: known Keras name, its shape, contiguous
    offsets covering [0, D) exactly, each parameter exactly once.
    """
    missing = [c for c in LAYOUT_COLUMNS if c not in layout.columns]
    if missing:
        raise ProbegenError(f"{source}: missing columns {missing} (expected {','.join(LAYOUT_COLUMNS)})")
    pt_shapes = dict(small_cnn.param_shapes(arch))
    n_convs = len(arch["channels"])
    tf_index = np.arange(sum(math.prod(s) for s in pt_shapes.values()))
    placed, end = {}, 0
    for r in layout.sort_values("start_idx").itertuples(index=False):
        name = _pt_name(r.varname, n_convs)
        if name is None or name in placed:
            raise ProbegenError(f"{source}: variable {r.varname!r} does not fit the Small CNN Zoo "
                                f"architecture ({'repeated' if name else 'unknown name'})")
        try:
            shape = tuple(int(v) for v in ast.literal_eval(str(r.shape)))
        except (ValueError, SyntaxError, TypeError):
            raise ProbegenError(f"{source}: {r.varname}: shape {r.shape!r} is not a tuple of ints") from None
        want = tf_shape(pt_shapes[name])
        start, stop = int(r.start_idx), int(r.end_idx)
        if shape != want or stop - start != math.prod(want) or start != end:
            raise ProbegenError(f"{source}: {r.varname} is shape {shape} at [{start},{stop}); the architecture "
                                f"needs shape {want} at [{end},{end + math.prod(want)})")
        block = tf_index[start:stop].reshape(shape)
        placed[name] = block.transpose(*_to_pt_axes(len(shape))).ravel()  # TF columns in PT order
        end = stop
    if set(placed) != set(pt_shapes):
        raise ProbegenError(f"{source}: lacks {sorted(set(pt_shapes) - set(placed))}")
    return np.concatenate([placed[name] for name in pt_shapes])  # PT param order


def _pt_name(varname, n_convs):
    m = VARNAME.fullmatch(str(varname))
    if m is None:
        return None
    kind, index, part = m.group(1), int(m.group(2) or 0), m.group(3)
    param = "weight" if part == "kernel" else "bias"
    if kind == "dense":
        return f"fc.{param}" if index == 0 else None
    return f"convs.{index}.{param}" if index < n_convs else None


def _to_pt_axes(ndim):
    return {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}[ndim]


def _layout_arg(layout):
    if layout is None:
        return tf_layout(), "layout"
    if isinstance(layout, (str, Path)):
        return read_layout(layout), str(layout)
    return layout, "layout"


def to_torch_layout(rows_tf, layout=None):
    """(n, 4970) TensorFlow-layout rows -> (n, 4970) PyTorch layout. layout: a layout.csv path or table
    (default: the published one)."""
    table, source = _layout_arg(layout)
    return np.ascontiguousarray(np.asarray(rows_tf)[:, layout_permutation(table, source=source)])


def to_tf_layout(rows_pt, layout=None):
    """Inverse of to_torch_layout."""
    table, source = _layout_arg(layout)
    perm = layout_permutation(table, source=source)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    return np.ascontiguousarray(np.asarray(rows_pt)[:, inverse])


def read_layout(path):
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ProbegenError(f"{path}: unreadable layout table ({err})") from None


# -----------------------------------------------------------------------------
# writer (fixtures, the embedded digits_cnn zoo)

def write_zoo(raw_dir, weights_tf, metrics_df, extras=None):
    """Write weights.npy / metrics.csv.gz / layout.csv in the published layout; the folder appears only
    complete. weights_tf: (N, 4970) TensorFlow layout; metrics_df: N rows with at least REQUIRED_METRICS.
    extras: {file name: JSON-able object} written beside them (e.g. a build summary)."""
    weights_tf = np.ascontiguousarray(weights_tf, dtype=np.float32)  # np.save writes C order
    if weights_tf.ndim != 2 or weights_tf.shape[1] != NUM_PARAMS:
        raise ProbegenError(f"{raw_dir}: weights of shape {weights_tf.shape} are not [N, 4970]")
    missing = [c for c in REQUIRED_METRICS if c not in metrics_df.columns]
    if missing or len(metrics_df) != len(weights_tf):
        raise ProbegenError(f"{raw_dir}: metrics need {len(weights_tf)} rows and the columns {missing}")
    with atomic_dir(raw_dir) as tmp:
        np.save(tmp / "weights.npy", weights_tf)
        # mtime=0 and no file name in the gzip header: the same zoo gives the same bytes (DVC hashes).
        with open(tmp / "metrics.csv.gz", "wb") as f, gzip.GzipFile("", "wb", fileobj=f, mtime=0) as gz:
            gz.write(metrics_df.to_csv(index=False).encode())
        tf_layout().to_csv(tmp / "layout.csv", index=False)
        for name, obj in (extras or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -----------------------------------------------------------------------------
# reader

def pack(raw_dir, out_dir, *, final_step=86, nonfinite="drop", progress=True, rows=None):
    """Pack the final checkpoints (step == final_step) of a Small CNN Zoo folder into a packed zoo.

    final_step: 86 for the published zoos; None takes every run's last checkpoint (its modeldir's
    largest step), whatever the training length. rows: optional weights.npy row indices to consider
    (e.g. those an official split file names).
    Returns the spec, plus `peak_rss_mb` of this process (kept out of spec.json: it is not a property
    of the data).
    """
    raw_dir = zoo_folder(Path(raw_dir))
    for name in FILES:
        if not (raw_dir / name).is_file():
            raise ProbegenError(f"{raw_dir / name}: missing (a Small CNN Zoo folder has {', '.join(FILES)})")
    weights = _open_weights(raw_dir / "weights.npy")
    metrics = _read_metrics(raw_dir / "metrics.csv.gz", len(weights))
    perm = layout_permutation(read_layout(raw_dir / "layout.csv"), source=str(raw_dir / "layout.csv"))
    if weights.shape[1] != len(perm):
        raise ProbegenError(f"{raw_dir / 'weights.npy'}: {weights.shape[1]} columns but layout.csv "
                            f"describes {len(perm)}")
    keep = _select(metrics, final_step, rows, raw_dir / "metrics.csv.gz")
    archs = _archs(metrics["config.activation"].to_numpy()[keep], keep, raw_dir / "metrics.csv.gz")
    meta_cols = [c for c in metrics.columns if c.startswith("config.")] + ["modeldir", "step", "train_accuracy"]
    spec = {**SPEC, "final_step": None if final_step is None else int(final_step)}
    writer = PackedWriter(out_dir, capacity=len(keep), total_params=len(keep) * len(perm), spec=spec,
                          nonfinite=nonfinite)
    with writer:
        for start in tqdm(range(0, len(keep), CHUNK_ROWS), desc="pack", disable=not progress):
            idx = keep[start:start + CHUNK_ROWS]
            chunk = _read_rows(weights, idx)[:, perm]  # (n, 4970) PyTorch layout
            m = metrics.iloc[idx]
            meta = m[meta_cols].assign(row=idx).to_dict("records")
            labels = _labels(m["test_accuracy"], raw_dir / "metrics.csv.gz")
            writer.add(chunk, labels, meta,
                       archs[start:start + CHUNK_ROWS], [f"weights.npy:{i}" for i in idx])
    return {**read_json(Path(out_dir) / "spec.json"), "peak_rss_mb": peak_rss_mb()}


def _labels(column, source):
    """test_accuracy -> float64 labels. NaN / inf is a diverged run (the nonfinite policy decides); text that
    is not a number is a damaged file, refused with the row that holds it."""
    labels = pd.to_numeric(column, errors="coerce")
    bad = labels.isna() & column.notna() & ~column.astype(str).str.strip().str.lower().isin(("nan", "inf", "-inf"))
    if bad.any():
        row = bad.index[bad.to_numpy()][0]
        raise ProbegenError(f"{source}: row {row}: test_accuracy {column[row]!r} is not a number")
    return labels.to_numpy(dtype=np.float64)


def zoo_folder(raw_dir):
    """The folder holding weights.npy: raw_dir itself, or the one folder inside it that does (the
    published cifar10.tar.xz unpacks into a top-level cifar10/)."""
    if (raw_dir / "weights.npy").exists():
        return raw_dir
    found = sorted({p.parent for p in raw_dir.rglob("weights.npy")})
    if len(found) > 1:
        raise ProbegenError(f"{raw_dir}: several Small CNN Zoo folders ({', '.join(map(str, found))}); "
                            f"keep one per zoo")
    return found[0] if found else raw_dir


def _open_weights(path):
    try:
        weights = np.load(path, mmap_mode="r")  # (rows, 4970), nothing read yet
    except (ValueError, OSError, EOFError) as err:
        raise ProbegenError(f"{path}: truncated or not a .npy file ({err})") from None
    if not isinstance(weights, np.ndarray):
        raise ProbegenError(f"{path}: not a .npy file (an .npz / zip archive)")
    if weights.ndim != 2 or weights.dtype != np.float32 or not weights.flags.c_contiguous:
        raise ProbegenError(f"{path}: expected C-ordered float32 [rows, 4970], got {weights.dtype} "
                            f"{weights.shape}")
    return weights


def _read_rows(weights, idx):
    """weights[idx] -> (n, D) copy, read row by row from the file.

    Not through the map: pages of a file map count as resident memory while mapped, and the kernel maps
    the neighbours of every touched page too, so gathering every 9th row of the 5.4 GB file through it
    would make most of the file resident. Plain reads keep it at one chunk.
    """
    out = np.empty((len(idx), weights.shape[1]), dtype=weights.dtype)
    with open(weights.filename, "rb") as f:
        for j, r in enumerate(idx):
            f.seek(weights.offset + int(r) * weights.strides[0])
            f.readinto(out[j])
    return out


def _read_metrics(path, n_rows):
    try:
        metrics = pd.read_csv(path, compression="gzip")
    except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ProbegenError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    missing = [c for c in REQUIRED_METRICS if c not in metrics.columns]
    if missing:
        raise ProbegenError(f"{path}: missing columns {missing}")
    if len(metrics) != n_rows:
        raise ProbegenError(f"{path}: {len(metrics)} rows but weights.npy has {n_rows}; they must match "
                            f"one to one")
    return metrics


def _select(metrics, final_step, rows, source):
    """Rows of weights.npy to pack, ascending: step == final_step (None: each run's last checkpoint,
    the largest step of its modeldir), within `rows` when given."""
    candidates = np.arange(len(metrics))
    if rows is not None:
        candidates = np.unique(np.asarray(rows, dtype=np.int64))
        bad = candidates[(candidates < 0) | (candidates >= len(metrics))]
        if len(bad):
            raise ProbegenError(f"{source}: row {bad[0]} requested but the zoo has {len(metrics)} rows")
    steps = pd.to_numeric(metrics["step"], errors="coerce")
    final = steps.groupby(metrics["modeldir"]).transform("max") if final_step is None else final_step
    keep = candidates[(steps == final).to_numpy()[candidates]]
    if len(keep) == 0:
        found = np.unique(steps.dropna())[:10].tolist()
        raise ProbegenError(f"{source}: no checkpoint with step == {final_step} (steps found: {found})")
    return keep


def _archs(activations, rows, source):
    unknown = [(r, a) for r, a in zip(rows, activations) if a not in small_cnn.ACTIVATIONS]
    if unknown:
        raise ProbegenError(f"{source}: row {unknown[0][0]} has unknown config.activation {unknown[0][1]!r}; "
                            f"known: {sorted(small_cnn.ACTIVATIONS)}")
    archs = {a: small_cnn.zoo_arch(a) for a in small_cnn.ACTIVATIONS}
    return [archs[a] for a in activations]


def peak_rss_mb():
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
