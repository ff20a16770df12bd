"""The CNN Wild Park zoo (Neural Graphs, Zenodo record 12797219): reader and fixture writer.

    <raw_dir>/.../<trial>/checkpoint_<N>/checkpoint.pt     one file per saved checkpoint, e.g.
    {"model": state dict (layers.{i}.weight/bias, fc.weight/bias),
     "config": the CNNConfig fields (n_layers, n_classes, channels, kernel_size, stride, padding,
               residual, activation) as an OmegaConf DictConfig (a plain dict is accepted too),
     "last_result": {"test/acc": float, ...},   the label
     "optimizer": ..., "iteration": int, ...}    the rest of Ray Tune's trainable state (ignored)

This is what cnn_trainer.NN_tune_trainable.save_checkpoint writes. Every checkpoint of every run is a
model of the zoo (117,241 of 2,800 runs). `id` = the path relative to raw_dir, which is how the official
split file (cnn_park_splits.json, {split: {path, score, step}}) names them.

Packing takes two passes over the files. The first reads only configs and tensor shapes (memory-mapped
loads touch no tensor data), so every bad file is reported before anything is written and the total
parameter count is known; the second streams the weights through PackedWriter in chunks of about 64 MB.
The packed zoo is ragged (each model stores its own parameter count): all 117k models take ~7.6 GB, where
zero-padding every model to the largest would take ~61 GB.
"""

import _compat_pickle
import functools
import json
import math
import pickle
import re
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probegen.errors import ProbegenError
from probegen.io import atomic_path, read_json
from probegen.nets import wild_park
from probegen.zoo.packed import PackedWriter

SPEC = {"family": "wild_park", "task": "regression", "format": "wild_park"}
CHUNK_BYTES = 64 << 20
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


def pack(raw_dir, out_dir, *, nonfinite="error", progress=True):
    raw_dir = Path(raw_dir)
    paths = sorted(raw_dir.rglob("checkpoint.pt"), key=lambda p: p.relative_to(raw_dir).as_posix())
    if not paths:
        raise ProbegenError(f"{raw_dir}: no <trial>/checkpoint_<N>/checkpoint.pt files")
    # Pass 1: validate everything and count the parameters before the output folder is created.
    load = _Loader()
    sizes = [_read(p, raw_dir, load, values=False)[0] for p in tqdm(paths, desc="scan", disable=not progress)]
    rows = max(1, CHUNK_BYTES // (4 * max(sizes)))
    writer = PackedWriter(out_dir, capacity=len(paths), total_params=sum(sizes), spec=SPEC, nonfinite=nonfinite)
    with writer, tqdm(total=len(paths), desc="pack", disable=not progress) as bar:
        for start in range(0, len(paths), rows):
            _add_chunk(writer, paths[start:start + rows], raw_dir, load)
            bar.update(min(rows, len(paths) - start))
    return read_json(Path(out_dir) / "spec.json")


def _add_chunk(writer, paths, raw_dir, load):
    flats, labels, metas, archs, sources = [], [], [], [], []
    for path in paths:
        _, arch, label, meta, flat = _read(path, raw_dir, load, values=True)
        flats.append(flat)
        labels.append(label)
        metas.append(meta)
        archs.append(arch)
        sources.append(path.relative_to(raw_dir).as_posix())
    writer.add(flats, labels, metas, archs, sources)


def _read(path, raw_dir, load, values):
    """One checkpoint -> (num_params, arch, label, meta, flat weights or None), or a ProbegenError."""
    rel = path.relative_to(raw_dir)
    step = CHECKPOINT_DIR.fullmatch(path.parent.name)
    if step is None or len(rel.parts) < 3:
        raise ProbegenError(f"{path}: expected the layout <trial>/checkpoint_<N>/checkpoint.pt")
    ckpt = load(path)
    if not isinstance(ckpt, Mapping) or not {"model", "config", "last_result"} <= set(ckpt):
        raise ProbegenError(f"{path}: not a Wild Park checkpoint (needs the keys model, config, last_result)")
    try:
        arch = wild_park.arch_from_config(_plain_config(ckpt["config"]))
    except ProbegenError as err:
        raise ProbegenError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:  # e.g. a width that is not a number
        raise ProbegenError(f"{path}: malformed config ({err})") from None
    label = ckpt["last_result"].get("test/acc") if isinstance(ckpt["last_result"], Mapping) else None
    if not isinstance(label, (int, float, np.floating)):
        raise ProbegenError(f"{path}: last_result['test/acc'] is missing or not a number ({label!r})")
    shapes = wild_park.param_shapes(arch)
    _check_state_dict(path, ckpt["model"], shapes)
    n = sum(math.prod(shape) for _, shape in shapes)
    if not values:
        return n, arch, None, None, None
    flat = torch.cat([ckpt["model"][name].detach().reshape(-1).float() for name, _ in shapes]).numpy()
    meta = {"run": rel.parent.parent.as_posix(), "step": int(step.group(1)),
            "iteration": int(ckpt.get("iteration", -1)),
            **{k: json.dumps(v) if isinstance(v, list) else v for k, v in wild_park.to_config(arch).items()}}
    return n, arch, float(label), meta, flat


def _check_state_dict(path, state_dict, shapes):
    if not isinstance(state_dict, Mapping):
        raise ProbegenError(f"{path}: model is a {type(state_dict).__name__}, not a state dict")
    expected = dict(shapes)
    if set(state_dict) != set(expected):
        extra, missing = sorted(set(state_dict) - set(expected)), sorted(set(expected) - set(state_dict))
        raise ProbegenError(f"{path}: state dict does not match its config (missing {missing}, unexpected {extra})")
    for name, shape in shapes:
        t = state_dict[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ProbegenError(f"{path}: state dict does not match its config ({name} is {got}, config says {shape})")


def _plain_config(cfg):
    """The checkpoint's config (OmegaConf DictConfig, plain dict, or a stood-in dataclass) -> a plain dict."""
    if isinstance(cfg, _StandIn):  # a CNNConfig dataclass pickled as such: its fields are the pickled state
        cfg = cfg.state if isinstance(cfg.state, Mapping) else {}
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # interpolation or structure errors of a foreign config
            raise ProbegenError(f"config cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(cfg, Mapping):
        raise ProbegenError(f"config is a {type(cfg).__name__}, not a mapping")
    return dict(cfg)


# ---------------------------------------------------------------------------------------------------
# Loading. torch.load(weights_only=True) refuses the zoo's files: their config is an OmegaConf DictConfig
# (and Ray's trainable state pickles more objects), which are not tensors. The plain unpickler
# (weights_only=False) is no way out either: it would run whatever a pickle asks for, and the OmegaConf
# config and Ray's last_result refer to neural-graphs' own CNNConfig dataclass
# (experiments.cnn_generalization.dataset.cnn_sampler), so it fails with "No module named 'experiments'"
# unless that repository is importable. So: weights_only=True first (plain-dict configs, our fixtures),
# and only when that refuses a global, a restricted unpickler that imports torch's tensor-rebuilding
# globals, OmegaConf's classes and a few builtin types, and turns every other global into an inert
# stand-in class. A checkpoint can then neither run code nor fail on a class we do not have.


def load_checkpoint(path):
    """torch.load one checkpoint safely (see above); any failure is one ProbegenError naming the file."""
    return _load(path, weights_only_first=True)[0]


class _Loader:
    """load_checkpoint for a whole zoo: once weights_only=True has refused a file, the rest go straight to
    the (equally safe) restricted unpickler. Each refusal costs a full parse (Ray pickles the model and
    optimizer tensors before the config), which doubled the packing time."""

    def __init__(self):
        self.weights_only_first = True

    def __call__(self, path):
        ckpt, restricted = _load(path, self.weights_only_first)
        self.weights_only_first = self.weights_only_first and not restricted
        return ckpt


def _load(path, weights_only_first):
    """-> (checkpoint, whether the restricted unpickler was needed)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        # Memory-mapping reads only the tensors we touch (not Ray's optimizer state); needs the zip format.
        kwargs = {"map_location": "cpu", "mmap": is_zip}
        if weights_only_first:
            try:
                return torch.load(path, weights_only=True, **kwargs), False
            except pickle.UnpicklingError as err:
                if "Weights only load failed" not in str(err):
                    raise
        return torch.load(path, weights_only=False, pickle_module=_RESTRICTED_PICKLE, **kwargs), True
    except Exception as err:
        raise ProbegenError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__}: "
                            f"{_first_line(err)})") from None


class _StandIn:
    """Inert stand-in for a class or function the restricted unpickler does not import."""

    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


_BUILTIN_TYPES = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                  "bytes", "bytearray", "object", "slice", "range", "NoneType"}
_TYPING = {"Any", "List", "Dict", "Tuple", "Optional", "Union", "Set", "Sequence", "Mapping"}
_OTHER = {("collections", "defaultdict"), ("operator", "getitem"), ("types", "GenericAlias"), ("numpy", "dtype"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_STAND_INS = {}


@functools.cache
def _torch_globals():
    from torch._weights_only_unpickler import _get_allowed_globals  # what weights_only=True itself allows
    return frozenset(_get_allowed_globals())


def _allowed(module, name):
    return (f"{module}.{name}" in _torch_globals() or (module == "builtins" and name in _BUILTIN_TYPES)
            or (module == "typing" and name in _TYPING) or (module, name) in _OTHER
            or module == "numpy.dtypes")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Protocol-2 pickles name Python 2 modules (__builtin__.unicode, ...); map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if _allowed(module, name):
            return super().find_class(module, name)
        if module.split(".")[0] == "omegaconf":
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # OmegaConf's classes only, none of its functions
                return obj
        key = (module, name)
        if key not in _STAND_INS:
            _STAND_INS[key] = type(name, (_StandIn,), {"__module__": module, "__qualname__": name})
        return _STAND_INS[key]


_RESTRICTED_PICKLE = types.ModuleType("probegen_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
# torch's legacy (non-zip) format reads its header records with load(): restricted too.
_RESTRICTED_PICKLE.load = lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load()


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------
# Writer (fixtures, embedded zoos)


def write_checkpoint(path, state_dict, config, test_acc, *, as_omegaconf=False, iteration=None):
    """Write one checkpoint.pt the way the zoo generator's save_checkpoint did.

    config: the CNNConfig fields (see wild_park.to_config), a plain dict or an OmegaConf DictConfig. A dict
    is stored as a plain dict unless as_omegaconf, which stores it as a DictConfig like the real zoo.
    """
    if as_omegaconf and isinstance(config, dict):
        try:
            from omegaconf import OmegaConf
        except ImportError:
            raise ProbegenError("as_omegaconf=True needs the omegaconf package (installed with dvc)") from None
        config = OmegaConf.create(dict(config))
    ckpt = {"model": {k: v.detach().cpu().clone() for k, v in state_dict.items()}, "config": config,
            "last_result": {"test/acc": float(test_acc)}}
    if iteration is not None:
        ckpt["iteration"] = int(iteration)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
