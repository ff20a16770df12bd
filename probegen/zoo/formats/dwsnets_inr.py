"""DWSNets INR checkpoints: the MNIST / Fashion-MNIST INR zoos (and the embedded digits zoo).

Published layouts, both found anywhere under the raw folder:

    mnist-inrs/mnist_png_<split>_<digit>_<id>/checkpoints/model_final.pth    label = <digit> of the folder
    digits-inrs/digits_png_<split>_<digit>_<id>/checkpoints/model_final.pth  (embedded zoo, same layout)
    fmnist_inrs/<split>/model_<idx>.pth                                      label = checkpoint["label"]

A checkpoint is a flat dict: the SIREN state dict (seq.0.weight ... seq.2.bias) and, for FMNIST, an int
`label` beside it (neural-graphs' preprocess_fmnist.py reads torch.load(p)["label"]; its INR dataset keeps
only the keys containing "weight"/"bias").
"""

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probegen.errors import ProbegenError
from probegen.io import atomic_path, read_json
from probegen.nets import siren
from probegen.zoo.packed import PackedWriter

ARCH = siren.DWSNETS_ARCH
NUM_CLASSES = 10
SPEC = {"family": "siren", "task": "classification", "num_classes": NUM_CLASSES, "format": "dwsnets_inr"}
MNIST_DIR = re.compile(r"^[a-z0-9]+_png_(?P<split>[a-z]+)_(?P<digit>\d)_\d+$")
FMNIST_FILE = re.compile(r"^model_\d+\.pth$")
CHUNK = 1024  # models per PackedWriter.add: bounds memory to a few MB whatever the zoo size


def find_checkpoints(raw_dir):
    """Sorted [(path, split_hint, folder_label or None)] for every checkpoint in either published layout."""
    found = []
    for path in Path(raw_dir).rglob("*.pth"):
        folder = MNIST_DIR.match(path.parent.parent.name)
        if path.name == "model_final.pth" and path.parent.name == "checkpoints" and folder:
            found.append((path, folder["split"], int(folder["digit"])))
        elif FMNIST_FILE.match(path.name):
            found.append((path, path.parent.name, None))
    return sorted(found, key=lambda item: item[0].relative_to(raw_dir).as_posix())


def read_checkpoint(path, folder_label=None, listed_label=None):
    """One checkpoint -> (flat float32 row (1185,), label). Any defect is a one-line ProbegenError.
    listed_label: the label a split file gives it (pack's label_file), if any."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt zip, truncated file, pickle of a non-tensor object, ...
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]  # first sentence only
        raise ProbegenError(f"{path}: unreadable checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(ckpt, dict):
        raise ProbegenError(f"{path}: expected a state dict, got {type(ckpt).__name__}")
    shapes = siren.param_shapes(ARCH)
    names = [name for name, _ in shapes]
    missing = [k for k in names if k not in ckpt]
    extra = [k for k in ckpt if k not in names and k != "label"]
    if missing or extra:
        problems = ", ".join(f"{what} {keys}" for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise ProbegenError(f"{path}: state dict keys do not match the DWSNets SIREN ({problems})")
    for name, shape in shapes:
        value = ckpt[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ProbegenError(f"{path}: {name} is not a floating-point tensor")
        if tuple(value.shape) != shape:
            raise ProbegenError(f"{path}: {name} has shape {tuple(value.shape)}, expected {shape}")
    row = torch.cat([ckpt[name].reshape(-1).float() for name in names]).numpy()
    return row, _label(path, ckpt.get("label"), folder_label, listed_label)


def _label(path, stored, folder_label, listed=None):
    """The checkpoint's label from its `label` key, its folder's digit or a split file (`listed`): at least
    one must be there, and all that are there must agree."""
    if stored is not None:
        if isinstance(stored, torch.Tensor) and stored.numel() == 1 and not stored.is_floating_point():
            stored = stored.item()
        if isinstance(stored, bool) or not isinstance(stored, int) or not 0 <= stored < NUM_CLASSES:
            raise ProbegenError(f"{path}: label must be an int in [0, {NUM_CLASSES}), got {stored!r}")
    found = [(what, v) for what, v in (("stored label", stored), ("folder's digit", folder_label),
                                       ("split file's label", listed)) if v is not None]
    if not found:
        raise ProbegenError(f"{path}: missing `label` (a model_<idx>.pth checkpoint must store its label, or "
                            f"name a split file with labels in zoo.<name>.pack.label_file)")
    for what, v in found[1:]:
        if v != found[0][1]:
            raise ProbegenError(f"{path}: {found[0][0]} {found[0][1]} disagrees with the {what} {v}")
    return found[0][1]


def pack(raw_dir, out_dir, *, nonfinite="error", progress=True, label_file=None):
    """Pack every checkpoint under raw_dir into out_dir (see probegen.zoo.packed). Returns the spec.
    label_file: a split file {split: {path, label}} that gives checkpoints without a label theirs."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise ProbegenError(f"{raw_dir}: not a folder")
    found = find_checkpoints(raw_dir)
    if not found:
        raise ProbegenError(f"{raw_dir}: no DWSNets INR checkpoints found (expected "
                            f"*_png_<split>_<digit>_<id>/checkpoints/model_final.pth or <split>/model_<idx>.pth)")
    dim = sum(int(np.prod(shape)) for _, shape in siren.param_shapes(ARCH))
    listed = {}
    if label_file is not None:
        from probegen.zoo.splits import split_file_labels

        listed = split_file_labels(label_file, [p.relative_to(raw_dir).as_posix() for p, _, _ in found])
    bar = tqdm(total=len(found), desc=f"pack {raw_dir.name}", unit="ckpt", disable=not progress)
    writer = PackedWriter(out_dir, capacity=len(found), total_params=len(found) * dim, spec=SPEC,
                          nonfinite=nonfinite)
    with bar, writer:
        for start in range(0, len(found), CHUNK):
            rows, labels, meta, sources = [], [], [], []
            for path, split_hint, folder_label in found[start:start + CHUNK]:
                row, label = read_checkpoint(path, folder_label, listed.get(path.relative_to(raw_dir).as_posix()))
                rows.append(row)
                labels.append(label)
                meta.append({"split_hint": split_hint})
                sources.append(path.relative_to(raw_dir).as_posix())
                bar.update()
            writer.add(np.stack(rows), labels, meta, [ARCH] * len(rows), sources)
    return read_json(Path(out_dir) / "spec.json")


def write_checkpoint(path, state_dict, label=None):
    """Atomically write one checkpoint as DWSNets did: a flat dict of tensors (+ `label` for FMNIST).

    Tensors are cloned so that a view into a large (N, D) tensor does not save the whole storage, and the
    file is written through a file object so the zip's internal folder name does not depend on the
    temporary file name: the same weights give the same bytes.
    """
    ckpt = {name: value.detach().cpu().clone() for name, value in state_dict.items()}
    if label is not None:
        ckpt["label"] = int(label)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
