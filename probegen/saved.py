"""The project's own run files (under models/, one per zoo, method and seed): the one place that writes
and reads them.

    save_run(path, zoo=, method=, seed=, method_cfg=, num_probes=, state_dict=, test_pred=, test_target=,
             metrics=)                                     written atomically
    load_run(path, zoo=, method=, seed=) -> SavedRun       checked against the run the caller expects
    load_trained(path, root, zoo=, method=, seed=) -> (method in eval mode, packed zoo, SavedRun)

A run file holds tensors and plain Python values only (str, int, float, bool, None, lists, tuples,
dicts), so it is read with torch.load(weights_only=True): a file pulled from a shared DVC remote cannot
run code, and anything else in it is refused with one line. It names its run and keeps the resolved
method config, from which the method is rebuilt and its state loaded strictly (every key, every shape):

    {"format": "probegen-run", "version": 1, "zoo": str, "method": str, "seed": int,
     "method_cfg": {...}, "num_probes": int | None, "state_dict": {name: tensor},
     "test_pred": tensor (N,), "test_target": tensor (N,), "metrics": {...}}

`metrics` is the run's metrics JSON without its timings (keys ending in `_seconds`): the model file says
what the model is, so retraining the same weights writes the same bytes; timings live in the JSON.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probegen.errors import ProbegenError
from probegen.io import atomic_path

FORMAT, VERSION = "probegen-run", 1
PLAIN_SCALARS = (str, int, float, bool, type(None))


@dataclass
class SavedRun:
    path: Path
    zoo: str
    method: str
    seed: int
    method_cfg: dict  # the resolved method.<name> entry of params.yaml
    num_probes: int | None  # None for weight-space methods
    state_dict: dict  # name -> tensor (CPU)
    test_pred: np.ndarray  # (N,) predicted class or value, test order
    test_target: np.ndarray  # (N,)
    metrics: dict


def save_run(path, *, zoo, method, seed, method_cfg, num_probes, state_dict, test_pred, test_target, metrics):
    """Write one run file (see the module docstring); it appears whole or not at all."""
    record = {
        "format": FORMAT, "version": VERSION, "zoo": str(zoo), "method": str(method), "seed": int(seed),
        "method_cfg": _plain(dict(method_cfg), "method_cfg"),
        "num_probes": None if num_probes is None else int(num_probes),
        "state_dict": {str(k): v.detach().to("cpu") for k, v in state_dict.items()},
        "test_pred": torch.from_numpy(np.ascontiguousarray(test_pred)),
        "test_target": torch.from_numpy(np.ascontiguousarray(test_target)),
        "metrics": _plain({k: v for k, v in metrics.items() if not k.endswith("_seconds")}, "metrics"),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(record, f)  # through a file object: the zip's folder is "archive", not the temp name


def _plain(value, where):
    """value with numpy scalars turned into Python ones; TypeError for anything not plain."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PLAIN_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a run file (plain values only)")


def load_run(path, *, zoo=None, method=None, seed=None):
    """Read and check one run file; zoo / method / seed, when given, must be the run it holds."""
    path = Path(path)
    if not path.is_file():
        raise ProbegenError(f"{path}: missing; run its training stage first")
    try:
        record = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ProbegenError(f"{path}: refused by the safe loader ({_refusal(err)}); nothing in the file was "
                            f"run. A file written before this format: rerun its training stage") from None
    except Exception as err:
        raise ProbegenError(f"{path}: corrupt or unreadable run file ({type(err).__name__}: "
                            f"{_first_line(err)})") from None
    run = _check(path, record)
    for what, want in (("zoo", zoo), ("method", method), ("seed", seed)):
        if want is not None and getattr(run, what) != want:
            raise ProbegenError(f"{path}: holds the run zoo={run.zoo} method={run.method} seed={run.seed}, "
                                f"not {what}={want}")
    return run


def _check(path, record):
    """The loaded dict -> SavedRun, or one ProbegenError naming the first thing that is wrong."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ProbegenError(f"{path}: not a probegen run file (no format: {FORMAT!r})")
    if record.get("version") != VERSION:
        raise ProbegenError(f"{path}: run file version {record.get('version')!r}, this probegen reads {VERSION}")
    expected = {"zoo": str, "method": str, "seed": int, "method_cfg": dict, "num_probes": (int, type(None)),
                "state_dict": dict, "test_pred": torch.Tensor, "test_target": torch.Tensor, "metrics": dict}
    for key, kind in expected.items():
        if isinstance(record.get(key), bool) or not isinstance(record.get(key), kind):
            raise ProbegenError(f"{path}: {key} is a {type(record.get(key)).__name__}, expected {_names(kind)}")
    bad = [k for k, v in record["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ProbegenError(f"{path}: state_dict entry {bad[0]!r} is not a named tensor")
    pred, target = record["test_pred"], record["test_target"]
    if pred.ndim != 1 or target.shape != pred.shape:
        raise ProbegenError(f"{path}: test_pred {tuple(pred.shape)} and test_target {tuple(target.shape)} "
                            f"are not two vectors of one length")
    return SavedRun(path, record["zoo"], record["method"], record["seed"], record["method_cfg"],
                    record["num_probes"], record["state_dict"], pred.numpy(), target.numpy(), record["metrics"])


def rebuild(run, zoo, probe_pool=None):
    """The trained method of `run` for the packed `zoo`, in eval mode: built from the saved config, then
    its state loaded strictly. A state that does not fit is one ProbegenError naming the file."""
    from probegen.methods import build_method

    method = build_method(run.method, zoo, run.method_cfg, num_probes=run.num_probes, probe_pool=probe_pool,
                          seed=run.seed)
    fresh = method.state_dict()
    missing, extra = sorted(set(fresh) - set(run.state_dict)), sorted(set(run.state_dict) - set(fresh))
    shapes = [k for k in fresh if k in run.state_dict and fresh[k].shape != run.state_dict[k].shape]
    if missing or extra or shapes:
        detail = f"missing {missing}, unexpected {extra}, other shape {shapes}"
        raise ProbegenError(f"{run.path}: the saved state does not fit {run.method} rebuilt from its saved "
                            f"config for zoo {run.zoo} ({detail})")
    method.load_state_dict(run.state_dict, strict=True)
    return method.eval()


def load_trained(path, root=".", *, zoo, method, seed, probe_pool=None):
    """(trained method in eval mode, its packed zoo data/zoos/<zoo>, the SavedRun) from one run file."""
    from probegen.zoo.packed import load_packed

    run = load_run(path, zoo=zoo, method=method, seed=seed)
    packed = load_packed(Path(root) / f"data/zoos/{run.zoo}")
    return rebuild(run, packed, probe_pool), packed, run


def _refusal(err):
    """torch's weights-only refusal is a paragraph; its one useful line names the global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "GLOBAL" in line:
            return line.split(". Please use")[0]  # not its advice to allowlist the global
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return f"WeightsUnpickler error: {lines[i + 1]}"  # e.g. an opcode it does not read
    return (lines or [type(err).__name__])[0]


def _first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _names(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
