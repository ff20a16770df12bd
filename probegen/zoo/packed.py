"""The packed zoo: what every reader produces and every method consumes.

    data/zoos/<zoo>/
      weights.npy   float32 [N, D], memory-mapped. Row i = model i's parameters, flattened in the order
                    and layout of its reference nn.Module's state_dict (PyTorch layout). Heterogeneous zoos
                    are zero-padded on the right to the largest D.
      labels.npy    [N] int64 (classification) or float32 (regression)
      meta.csv      one row per model: `id` (where it came from in the raw zoo), `arch` (index into
                    spec["archs"]), plus format-specific columns
      spec.json     {"family", "task", "num_classes", "archs": [arch dicts], "format", "num_models",
                     "dropped_nonfinite", ...}

Models are written in chunks through PackedWriter, so packing 70,000 checkpoints needs bounded memory.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from probegen.errors import ProbegenError
from probegen.io import atomic_dir

TASKS = ("classification", "regression")
NONFINITE_POLICIES = ("error", "drop")


@dataclass
class PackedZoo:
    root: Path
    weights: np.ndarray  # (N, D) float32 memmap
    labels: np.ndarray  # (N,)
    meta: pd.DataFrame  # N rows
    spec: dict

    @property
    def family(self):
        return self.spec["family"]

    @property
    def task(self):
        return self.spec["task"]

    @property
    def num_classes(self):
        return self.spec.get("num_classes")

    @property
    def archs(self):
        return self.spec["archs"]

    @property
    def arch_ids(self):
        return self.meta["arch"].to_numpy(dtype=np.int64)

    def __len__(self):
        return len(self.labels)


def load_packed(root):
    root = Path(root)
    for name in ("weights.npy", "labels.npy", "meta.csv", "spec.json"):
        if not (root / name).exists():
            raise ProbegenError(f"{root / name}: missing; run the pack stage first")
    weights = np.load(root / "weights.npy", mmap_mode="r")
    labels = np.load(root / "labels.npy")
    meta = pd.read_csv(root / "meta.csv", keep_default_na=False)
    spec = json.loads((root / "spec.json").read_text())
    if weights.ndim != 2 or weights.dtype != np.float32:
        raise ProbegenError(f"{root / 'weights.npy'}: expected float32 [N, D], got {weights.dtype} {weights.shape}")
    if not (len(weights) == len(labels) == len(meta)):
        raise ProbegenError(f"{root}: weights, labels and meta disagree on N ({len(weights)}, {len(labels)}, {len(meta)})")
    return PackedZoo(root, weights, labels, meta, spec)


class PackedWriter:
    """Streams models into a packed zoo folder; the folder appears only when close() succeeds.

        with PackedWriter(out, capacity=N, dim=D, spec=spec, nonfinite="drop") as w:
            w.add(weights_chunk, labels_chunk, meta_rows, archs, sources)

    `sources` name each model's file (or file + row) for error messages. With nonfinite="error" a model
    with NaN/inf weights raises ProbegenError naming its source; with "drop" it is skipped and counted.
    """

    def __init__(self, out_dir, capacity, dim, spec, nonfinite="error"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ProbegenError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if spec.get("task") not in TASKS:
            raise ProbegenError(f"spec task: expected one of {TASKS}, got {spec.get('task')!r}")
        self.out_dir, self.capacity, self.dim = Path(out_dir), int(capacity), int(dim)
        self.spec, self.nonfinite = dict(spec), nonfinite
        self.label_dtype = np.int64 if spec["task"] == "classification" else np.float32
        self._ctx = atomic_dir(self.out_dir)
        self.tmp = self._ctx.__enter__()
        self.weights = np.lib.format.open_memmap(self.tmp / "weights.npy", mode="w+", dtype=np.float32,
                                                 shape=(self.capacity, self.dim))
        self.labels, self.meta, self.arch_keys, self.archs = [], [], {}, []
        self.count, self.dropped = 0, []

    def add(self, weights, labels, meta_rows, archs, sources):
        weights = np.asarray(weights, dtype=np.float32)  # (n, d) with d <= D
        n = len(weights)
        if weights.ndim != 2 or weights.shape[1] > self.dim:
            raise ProbegenError(f"{sources[0]}: weights of shape {weights.shape} do not fit [n, {self.dim}]")
        if not (n == len(labels) == len(meta_rows) == len(archs) == len(sources)):
            raise ProbegenError(f"{sources[0]}: chunk lengths disagree")
        finite = np.isfinite(weights).all(axis=1) & np.isfinite(np.asarray(labels, dtype=np.float64))
        if not finite.all():
            bad = [s for s, ok in zip(sources, finite) if not ok]
            if self.nonfinite == "error":
                raise ProbegenError(f"{bad[0]}: non-finite (NaN/inf) weights or label")
            self.dropped.extend(bad)
        keep = np.flatnonzero(finite)
        if self.count + len(keep) > self.capacity:
            raise ProbegenError(f"{sources[0]}: more models than the declared capacity {self.capacity}")
        self.weights[self.count:self.count + len(keep), :weights.shape[1]] = weights[keep]
        self.weights[self.count:self.count + len(keep), weights.shape[1]:] = 0.0
        self.count += len(keep)
        for i in keep:
            self.labels.append(labels[i])
            self.meta.append({"id": sources[i], "arch": self._arch_index(archs[i]), **meta_rows[i]})

    def _arch_index(self, arch):
        key = json.dumps(arch, sort_keys=True)
        if key not in self.arch_keys:
            self.arch_keys[key] = len(self.archs)
            self.archs.append(arch)
        return self.arch_keys[key]

    def close(self):
        if self.count == 0:
            raise ProbegenError(f"{self.out_dir}: no usable models")
        self.weights.flush()
        del self.weights
        if self.count < self.capacity:
            _shrink_rows(self.tmp / "weights.npy", self.count)
        np.save(self.tmp / "labels.npy", np.asarray(self.labels, dtype=self.label_dtype))
        pd.DataFrame(self.meta).to_csv(self.tmp / "meta.csv", index=False)
        spec = {**self.spec, "archs": self.archs, "num_models": self.count,
                "dropped_nonfinite": len(self.dropped)}
        (self.tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        self._ctx.__exit__(None, None, None)
        return spec

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            if hasattr(self, "weights"):
                del self.weights
            self._ctx.__exit__(exc_type, exc, tb)
        return False


def _shrink_rows(path, n, chunk=4096):
    """Keep the first n rows of an .npy file, copying in chunks (never the whole array in memory)."""
    src = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".shrink.npy")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(n, src.shape[1]))
    for start in range(0, n, chunk):
        dst[start:start + chunk] = src[start:min(start + chunk, n)]
    dst.flush()
    del dst, src
    tmp.replace(path)
