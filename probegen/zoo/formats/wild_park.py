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
import collections
import contextlib
import functools
import importlib
import json
import math
import pathlib
import pickle
import re
import sys
import types
import typing
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
    # Plain dicts only around the config (what torch.save and Ray write): a lookup in an OmegaConf
    # container would resolve interpolations, i.e. call resolvers the file chose.
    if not isinstance(ckpt, dict) or not {"model", "config", "last_result"} <= set(ckpt):
        raise ProbegenError(f"{path}: not a Wild Park checkpoint (needs the keys model, config, last_result)")
    try:
        arch = wild_park.arch_from_config(_plain_config(ckpt["config"]))
    except ProbegenError as err:
        raise ProbegenError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:  # e.g. a width that is not a number
        raise ProbegenError(f"{path}: malformed config ({err})") from None
    label = ckpt["last_result"].get("test/acc") if isinstance(ckpt["last_result"], dict) else None
    if isinstance(label, bool) or not isinstance(label, (int, float, np.floating)):
        raise ProbegenError(f"{path}: last_result['test/acc'] is missing or not a number ({label!r})")
    shapes = wild_park.param_shapes(arch)
    _check_state_dict(path, ckpt["model"], shapes)
    n = sum(math.prod(shape) for _, shape in shapes)
    if not values:
        return n, arch, None, None, None
    iteration = ckpt.get("iteration", -1)
    if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)):
        raise ProbegenError(f"{path}: iteration is a {type(iteration).__name__}, not an int")
    flat = torch.cat([ckpt["model"][name].detach().reshape(-1).float() for name, _ in shapes]).numpy()
    meta = {"run": rel.parent.parent.as_posix(), "step": int(step.group(1)), "iteration": int(iteration),
            **{k: json.dumps(v) if isinstance(v, list) else v for k, v in wild_park.to_config(arch).items()}}
    return n, arch, float(label), meta, flat


def _check_state_dict(path, state_dict, shapes):
    if not isinstance(state_dict, dict):
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
    if _is_omegaconf(cfg):
        from omegaconf import OmegaConf
        try:
            # Not resolved: a resolver is code the file would choose to call. The zoo's configs hold
            # values only (the trainer resolved its config before building the model config).
            cfg = OmegaConf.to_container(cfg, resolve=False)
        except Exception as err:  # structure errors of a foreign config
            raise ProbegenError(f"config cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(cfg, Mapping):
        raise ProbegenError(f"config is a {type(cfg).__name__}, not a mapping")
    return dict(cfg)


def _is_omegaconf(obj):
    try:
        from omegaconf import Container
    except ImportError:  # then no OmegaConf object can have been unpickled either
        return False
    return isinstance(obj, Container)


# ---------------------------------------------------------------------------------------------------
# Loading. torch.load(weights_only=True) refuses the zoo's files: their config is an OmegaConf DictConfig
# (Ray Tune's save_checkpoint pickles the trainer's `cfg.model` node, its parent config and the trial
# config), which is not a tensor. The plain unpickler (weights_only=False) would run whatever a pickle
# asks for, and fails anyway on neural-graphs' own CNNConfig dataclass
# (experiments.cnn_generalization.dataset.cnn_sampler) unless that repository is importable.
#
# So: weights_only=True first (plain-dict configs, our fixtures), and only when that refuses a global, a
# restricted unpickler. It resolves a global only by exact (module, qualified name) lookup in safe_globals()
# (never an import or attribute walk driven by the file), and for every other name:
#   - a module of the standard library, torch, numpy, omegaconf or probegen: refused, one ProbegenError
#     naming the file and the global (a clear answer for os.system, builtins.exec & co.; a real
#     checkpoint names nothing else from these);
#   - any other module (the foreign CNNConfig, Ray's classes): an inert stand-in class. The module is
#     never imported, so nothing in it can run; building the stand-in (a call, or __new__ then
#     __setstate__) only stores the arguments.
# Each allowed global is a class or function that only builds data from data. Those that could do more
# with other arguments (type, operator.getitem, _codecs.encode) are replaced by guarded versions.


class UnsafeGlobal(pickle.UnpicklingError):
    """A pickle names (or calls) a global the restricted unpickler does not allow."""


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
    except UnsafeGlobal as err:
        raise ProbegenError(f"{path}: refused: {err}; nothing in the file was run") from None
    except Exception as err:
        raise ProbegenError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__}: "
                            f"{_first_line(err)})") from None


# The OmegaConf classes a pickled DictConfig / ListConfig refers to (omegaconf 2.1 - 2.3): containers,
# their metadata dataclasses, and one node class per value type.
OMEGACONF_GLOBALS = (
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"), ("omegaconf.base", "UnionNode"),
    ("omegaconf.nodes", "AnyNode"), ("omegaconf.nodes", "IntegerNode"), ("omegaconf.nodes", "FloatNode"),
    ("omegaconf.nodes", "BooleanNode"), ("omegaconf.nodes", "StringNode"), ("omegaconf.nodes", "BytesNode"),
    ("omegaconf.nodes", "PathNode"), ("omegaconf.nodes", "EnumNode"),
)
# What those refer to: the metadata's key / element / reference types, the resolver cache (defaultdict),
# and the trial config's dataset path (a pathlib path; `pathlib._local` is its module from Python 3.13).
BUILTIN_TYPES = (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)
TYPING_NAMES = ("Any", "List", "Dict", "Tuple", "Union", "Optional")
PATH_TYPES = (pathlib.Path, pathlib.PurePath, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
              pathlib.PureWindowsPath)
# Modules whose unlisted names are refused rather than stood in for (see above).
KNOWN_PACKAGES = frozenset(sys.stdlib_module_names) | {"torch", "numpy", "omegaconf", "probegen"} | {
    m.split(".")[0] for m in _compat_pickle.IMPORT_MAPPING}


def _type_of(*args):
    """builtins.type, as pickle uses it: type(None) (also type(...) and type(NotImplemented)); never the
    three-argument form, which builds a class."""
    if len(args) == 1 and (args[0] is None or args[0] is Ellipsis or args[0] is NotImplemented):
        return type(args[0])
    what = f"{len(args)} arguments" if len(args) != 1 else f"a {type(args[0]).__name__}"
    raise UnsafeGlobal(f"the pickle calls builtins.type on {what}, not on None")


def _typing_subscript(origin, args):
    """operator.getitem, as pickle uses it: typing.List[int], Dict[str, Any], Union[int, None], ..."""
    if not any(origin is getattr(typing, name) for name in TYPING_NAMES if name != "Any"):
        raise UnsafeGlobal(f"the pickle calls operator.getitem on a {type(origin).__name__}, "
                           f"not on one of typing.{', typing.'.join(TYPING_NAMES[1:])}")
    parts = args if isinstance(args, tuple) else (args,)
    if not all(isinstance(a, type) or type(a).__module__ == "typing" or a is Ellipsis for a in parts):
        raise UnsafeGlobal("the pickle subscripts a typing generic with something that is not a type")
    return origin[args]


def _latin1(text, encoding):
    """_codecs.encode, as pickle protocol 2 uses it for bytes: encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeGlobal(f"the pickle calls _codecs.encode with encoding {encoding!r}, not 'latin1'")
    return text.encode("latin1")


@functools.cache
def safe_globals():
    """{(module, qualified name): object}: every global the restricted unpickler resolves, exactly."""
    from torch._weights_only_unpickler import _get_allowed_globals  # what weights_only=True itself allows

    table = {tuple(key.rsplit(".", 1)): obj for key, obj in _get_allowed_globals().items()}
    table |= {("builtins", t.__name__): t for t in BUILTIN_TYPES}
    table |= {("collections", t.__name__): t for t in (collections.OrderedDict, collections.defaultdict,
                                                       collections.Counter)}
    table |= {("typing", name): getattr(typing, name) for name in TYPING_NAMES}
    table |= {(module, t.__name__): t for t in PATH_TYPES for module in ("pathlib", "pathlib._local")}
    table |= {(module, "scalar"): _numpy_scalar() for module in ("numpy.core.multiarray", "numpy._core.multiarray")}
    table[("numpy", "dtype")] = np.dtype
    # guarded versions of the three that pickle calls with harmless arguments only
    table[("builtins", "type")] = _type_of
    table[("operator", "getitem")] = table[("_operator", "getitem")] = _typing_subscript
    table[("_codecs", "encode")] = _latin1
    for module, name in OMEGACONF_GLOBALS:  # those this omegaconf version has
        with contextlib.suppress(ImportError, AttributeError):
            table[(module, name)] = getattr(importlib.import_module(module), name)
    return table


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


class _StandIn:
    """Inert stand-in for a class or function of a foreign module: it is never imported, and building it
    (by a call, or by __new__ then __setstate__ as pickle does for plain classes) only stores arguments."""

    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


@functools.lru_cache(maxsize=1024)
def _stand_in(module, name):
    return type(name, (_StandIn,), {"__module__": module, "__qualname__": name})


def find_global(module, name):
    """What the restricted unpickler returns for a pickle's global (module, name), or UnsafeGlobal."""
    # Protocol-2 pickles name Python 2 modules (__builtin__.unicode, ...); map them as pickle does.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = safe_globals().get((module, name))
    if found is not None:
        return found
    if module.split(".")[0] in KNOWN_PACKAGES or not module:
        raise UnsafeGlobal(f"the pickle names the global {module}.{name}, which is not on the allowlist")
    return _stand_in(module, name)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return find_global(module, name)


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
