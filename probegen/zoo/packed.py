"""The packed zoo: what every reader produces and every method consumes.

    data/zoos/<zoo>/
      weights.npy   float32 [T], memory-mapped: every model's parameters back to back. Model i's are
                    weights[offsets[i]:offsets[i+1]], flattened in the order and layout of its reference
                    nn.Module's state_dict (PyTorch layout). Stored ragged, so a zoo of mixed sizes costs
                    its real parameter count (CNN Wild Park: ~7.6 GB, not the ~61 GB of padding every
                    model to the largest).
      offsets.npy   int64 [N + 1], offsets[0] = 0, offsets[N] = T
      labels.npy    [N] int64 (classification) or float32 (regression)
      meta.csv      one row per model: `id` (where it came from in the raw zoo), `arch` (index into
                    spec["archs"]), plus format-specific columns
      spec.json     {"family", "task", "num_classes", "archs": [arch dicts], "format", "num_models",
                     "dropped_nonfinite", ...}

Readers see the weights as `zoo.weights`, a ZooRows: rows[idx] -> (len(idx), D) float32 tensor, each
model zero-padded on the right to D = the largest model's size (the batched forwards ignore the padding).
Models are written in chunks through PackedWriter, so packing 70,000 checkpoints needs bounded memory.
"""

import contextlib
import errno
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probegen.errors import ProbegenError
from probegen.io import atomic_dir
from probegen.nets import num_params

TASKS = ("classification", "regression")
NONFINITE_POLICIES = ("error", "drop")


class ZooRows:
    """Models of different sizes stored back to back, read as zero-padded rows.

    flat (T,) float32 and offsets (N + 1,) int64 tensors, on any device (a CPU memmap or the GPU).
    rows[idx] -> (len(idx), D), rows[i] -> (D,). No Python loop over models. D = width: by default the
    largest model; a subset made by select() keeps its zoo's D, which is what the methods are built for.
    """

    def __init__(self, flat, offsets, width=None):
        self.flat, self.offsets = flat, offsets
        self.sizes = offsets[1:] - offsets[:-1]  # (N,) parameters per model
        if width is None:
            width = int(self.sizes.max()) if len(self.sizes) else 0
        self.shape = (len(self.sizes), int(width))
        # All models the same size (the INR and Small CNN zoos): rows are plain slices of an (N, D) view.
        uniform = bool((self.sizes == width).all())
        start = int(offsets[0]) if len(offsets) else 0
        self.matrix = flat[start:start + self.shape[0] * width].view(self.shape) if uniform else None

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """Bytes of parameters actually stored (not counting padding)."""
        return int(self.offsets[-1]) * self.flat.element_size()

    def __getitem__(self, idx):
        if np.ndim(idx) == 0 and not isinstance(idx, slice):  # one model -> (D,)
            return self[[int(idx)]][0]
        return self.take(self._positions(idx))

    def take(self, idx):
        """Rows idx -> (B, D): idx a (B,) long tensor on this zoo's device, already in [0, N) (what
        _positions makes of any index; the training loop's own permutations). Unchecked: no host sync."""
        if self.matrix is not None:
            return self.matrix[idx]
        values, sizes = self._gather(idx)
        inside = torch.arange(self.shape[1], device=sizes.device) < sizes[:, None]  # (B, D) real entries
        out = self.flat.new_zeros((len(idx), self.shape[1]))
        out[inside] = values  # row-major, as _gather lays them out
        return out

    def select(self, idx, chunk=1024):
        """Models idx (in that order) as a new, compact ZooRows: a split held in memory stays ragged.
        Gathered `chunk` models at a time, which bounds the index arrays _gather builds."""
        idx = self._positions(idx)
        sizes = self.sizes[idx]  # (B,)
        if self.matrix is not None:
            values = self.matrix[idx].reshape(-1)
        else:
            values = self.flat.new_empty(int(sizes.sum()))
            at = 0
            for s in range(0, len(idx), chunk):
                part = self._gather(idx[s:s + chunk])[0]
                values[at:at + len(part)] = part
                at += len(part)
        return ZooRows(values, torch.cat([idx.new_zeros(1), torch.cumsum(sizes, 0)]), self.shape[1])

    def to(self, device):
        return ZooRows(self.flat.to(device), self.offsets.to(device), self.shape[1])

    def _positions(self, idx):
        """Any index (slice, ints, bool mask; numpy, list or tensor) -> (B,) long tensor in [0, N)."""
        if isinstance(idx, slice):
            return torch.arange(*idx.indices(len(self)), device=self.flat.device)
        idx = idx if torch.is_tensor(idx) else torch.as_tensor(np.ascontiguousarray(idx))
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {tuple(idx.shape)} for {len(self)} models")
            idx = torch.nonzero(idx).squeeze(1)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dim() != 1:
            raise IndexError(f"model indices must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}")
        idx = idx.to(device=self.flat.device, dtype=torch.long)
        idx = torch.where(idx < 0, idx + len(self), idx)  # numpy's negative indices
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"model index out of range for {len(self)} models")
        return idx

    def _gather(self, idx):
        """(B,) model indices -> (their parameters back to back (sum of sizes,), sizes (B,))."""
        sizes = self.sizes[idx]  # (B,)
        ends = torch.cumsum(sizes, 0)
        total = int(ends[-1]) if len(ends) else 0
        # Position of every wanted parameter in flat: its model's offset + its index within the model.
        within = torch.arange(total, device=sizes.device) - torch.repeat_interleave(ends - sizes, sizes)
        return self.flat[torch.repeat_interleave(self.offsets[idx], sizes) + within], sizes


def ragged(flat, sizes):
    """flat (T,) parameters back to back + sizes (N,) parameters per model -> ZooRows (zoos in memory)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (N + 1,)
    return ZooRows(torch.as_tensor(flat, dtype=torch.float32), torch.from_numpy(offsets))


@dataclass
class PackedZoo:
    root: Path
    weights: ZooRows  # (N, D) float32, zero-padded rows
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
    for name in ("weights.npy", "offsets.npy", "labels.npy", "meta.csv", "spec.json"):
        if not (root / name).exists():
            raise ProbegenError(f"{root / name}: missing; run the pack stage first")
    try:
        flat = np.load(root / "weights.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(root / "offsets.npy", allow_pickle=False)
        labels = np.load(root / "labels.npy", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # object arrays (pickles) are refused, never loaded
        raise ProbegenError(f"{root}: unreadable packed zoo array ({err})") from None
    meta = pd.read_csv(root / "meta.csv", keep_default_na=False)
    spec = json.loads((root / "spec.json").read_text())
    if flat.ndim != 1 or flat.dtype != np.float32:
        raise ProbegenError(f"{root / 'weights.npy'}: expected float32 [T], got {flat.dtype} {flat.shape}")
    if (offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) == 0 or offsets[0] != 0
            or (np.diff(offsets) <= 0).any() or offsets[-1] != len(flat)):
        raise ProbegenError(f"{root / 'offsets.npy'}: expected increasing int64 offsets from 0 to {len(flat)}")
    if not (len(offsets) - 1 == len(labels) == len(meta)):
        raise ProbegenError(f"{root}: offsets, labels and meta disagree on N "
                            f"({len(offsets) - 1}, {len(labels)}, {len(meta)})")
    with warnings.catch_warnings():  # a read-only memmap: torch warns that it is not writable, and never writes
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        weights = ZooRows(torch.from_numpy(flat), torch.from_numpy(offsets))
    return PackedZoo(root, weights, labels, meta, spec)


class PackedWriter:
    """Streams models into a packed zoo folder; the folder appears only when close() succeeds.

        with PackedWriter(out, capacity=N, total_params=T, spec=spec, nonfinite="drop") as w:
            w.add(rows, labels_chunk, meta_rows, archs, sources)

    capacity and total_params bound the models and their parameters together (the weights file's space
    is reserved up front, so a full disk fails at once, then the file is trimmed to what was written).
    rows: an (n, d) array, or n flat arrays, each exactly its architecture's
    parameter count (spec["family"] says how to count). `sources` name each model's file (or file + row)
    for error messages. With nonfinite="error" a model with NaN/inf weights raises ProbegenError naming
    its source; with "drop" it is skipped and counted.
    """

    def __init__(self, out_dir, capacity, total_params, spec, nonfinite="error"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ProbegenError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if spec.get("task") not in TASKS:
            raise ProbegenError(f"spec task: expected one of {TASKS}, got {spec.get('task')!r}")
        self.out_dir, self.capacity, self.total_params = Path(out_dir), int(capacity), int(total_params)
        self.spec, self.nonfinite = dict(spec), nonfinite
        self.label_dtype = np.int64 if spec["task"] == "classification" else np.float32
        self._ctx = atomic_dir(self.out_dir)
        self.tmp = self._ctx.__enter__()
        try:
            self._weights = _reserved_npy(self.tmp / "weights.npy", self.total_params)
        except BaseException as err:  # a full disk: one error line naming out_dir, no temporary folder left
            self._abort(type(err), err, err.__traceback__)
            raise
        self.offsets, self.labels, self.meta, self.arch_keys, self.archs, self.arch_sizes = [0], [], [], {}, [], {}
        self.dropped = []

    def add(self, rows, labels, meta_rows, archs, sources):
        rows = [np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]  # each model's parameters
        if not (len(rows) == len(labels) == len(meta_rows) == len(archs) == len(sources)):
            raise ProbegenError(f"{sources[0]}: chunk lengths disagree")
        labels = np.asarray(labels, dtype=np.float64)
        keep = []
        for i, row in enumerate(rows):
            expected = self._arch_size(archs[i])
            if row.size != expected:
                raise ProbegenError(f"{sources[i]}: {row.size} parameters, but its architecture has {expected}")
            if np.isfinite(row).all() and np.isfinite(labels[i]):
                keep.append(i)
            elif self.nonfinite == "error":
                raise ProbegenError(f"{sources[i]}: non-finite (NaN/inf) weights or label")
            else:
                self.dropped.append(sources[i])
        if keep:
            self._append([rows[i] for i in keep], [sources[i] for i in keep])
        for i in keep:
            self.labels.append(labels[i])
            self.meta.append({"id": sources[i], "arch": self._arch_index(archs[i]), **meta_rows[i]})

    def _append(self, rows, sources):
        start, count = self.offsets[-1], len(self.offsets) - 1
        ends = start + np.cumsum([row.size for row in rows])  # where each model's parameters end
        over = (count + np.arange(1, len(rows) + 1) > self.capacity) | (ends > self.total_params)
        if over.any():
            raise ProbegenError(f"{sources[int(np.argmax(over))]}: more models or parameters than declared "
                                f"({self.capacity} models, {self.total_params} parameters)")
        self._weights.write(np.concatenate(rows))  # (sum of sizes,) float32, right after the previous chunk
        self.offsets.extend(int(e) for e in ends)

    def _arch_size(self, arch):
        key = json.dumps(arch, sort_keys=True)
        if key not in self.arch_sizes:
            self.arch_sizes[key] = num_params(self.spec["family"], arch)
        return self.arch_sizes[key]

    def _arch_index(self, arch):
        """Index of arch in spec["archs"], which lists the architectures of the models kept."""
        key = json.dumps(arch, sort_keys=True)
        if key not in self.arch_keys:
            self.arch_keys[key] = len(self.archs)
            self.archs.append(arch)
        return self.arch_keys[key]

    def close(self):
        try:
            spec = self._finish()
        except BaseException as err:  # e.g. no usable models: leave no temporary folder behind
            self._abort(type(err), err, err.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)
        return spec

    def _finish(self):
        count = len(self.offsets) - 1
        if count == 0:
            raise ProbegenError(f"{self.out_dir}: no usable models")
        self._weights.close()
        if self.offsets[-1] < self.total_params:
            _truncate(self.tmp / "weights.npy", self.offsets[-1])
        np.save(self.tmp / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.tmp / "labels.npy", np.asarray(self.labels, dtype=self.label_dtype))
        pd.DataFrame(self.meta).to_csv(self.tmp / "meta.csv", index=False)
        spec = {**self.spec, "archs": self.archs, "num_models": count, "dropped_nonfinite": len(self.dropped)}
        (self.tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        return spec

    def _abort(self, *exc_info):
        if hasattr(self, "_weights"):
            with contextlib.suppress(OSError):  # flushing the buffer may fail too (a full disk): it still closes
                self._weights.close()
        self._ctx.__exit__(*exc_info)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort(exc_type, exc, tb)
        return False


def _reserved_npy(path, n):
    """A .npy file for n float32 values with their disk space reserved for real, open at the first value.

    The space is allocated now (posix_fallocate), so a full disk is an OSError (ENOSPC) before any model
    is read, not a SIGBUS on a write through a memory map into a sparse file, hours later. The values are
    then written with plain sequential writes, whose failures are OSErrors too.
    """
    f = open(path, "wb")
    try:
        np.lib.format.write_array_header_1_0(f, _header(n, np.dtype(np.float32)))
        f.flush()
        try:
            os.posix_fallocate(f.fileno(), 0, f.tell() + 4 * n)
        except OSError as err:  # a filesystem that cannot reserve: the plain writes still fail cleanly
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    except BaseException:
        f.close()
        raise
    return f


def _header(n, dtype):
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(n),)}


def _truncate(path, n, chunk=1 << 26):
    """Keep the first n values of a 1-D .npy file: rewrite its header for (n,) and cut the file, in place
    (numpy pads headers so that the length does not change); else copy in chunks of `chunk` bytes. Plain
    reads and writes: no memory map, so a full disk is an OSError."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dtype = read(f)[2]
        start = f.tell()
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, _header(n, dtype))
        if len(head.getvalue()) == start:
            f.seek(0)
            f.write(head.getvalue())
            f.truncate(start + n * dtype.itemsize)
            return
    trimmed = path.with_suffix(".trim.npy")
    with open(path, "rb") as src, open(trimmed, "wb") as dst:
        dst.write(head.getvalue())
        src.seek(start)
        left = n * dtype.itemsize
        while left:
            block = src.read(min(chunk, left))
            dst.write(block)
            left -= len(block)
    trimmed.replace(path)
