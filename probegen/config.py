"""params.yaml -> small validated dataclasses. Each stage reads params once, through these accessors.

Every accessor checks the keys it returns and raises ProbegenError with one line naming the key:
    params.yaml: num_probes: expected a positive integer, got 0
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from probegen.errors import ProbegenError

PARAMS = "params.yaml"
FORMATS = ("dwsnets_inr", "small_cnn_zoo", "wild_park")
SOURCES = ("embedded", "url", "path")
EMBEDDED_ZOOS = {"digits_inr": "dwsnets_inr", "digits_cnn": "small_cnn_zoo"}
SPLIT_KINDS = ("deterministic", "inr_official", "small_cnn_official", "wild_park_official")
OPTIMIZERS = ("adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")


def load_params(path=PARAMS):
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProbegenError(f"{path}: not found") from None
    except yaml.YAMLError as err:
        raise ProbegenError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ProbegenError(f"{path}: expected a mapping at the top level")
    return params


def _get(params, dotted):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ProbegenError(f"{PARAMS}: {dotted}: missing")
        node = node[part]
    return node


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProbegenError(f"{PARAMS}: {key}: expected a positive integer, got {value!r}")
    return value


def _positive_float(value, key, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or allow_zero and value == 0)
    if not ok:
        raise ProbegenError(f"{PARAMS}: {key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


def _choice(value, key, choices):
    if value not in choices:
        raise ProbegenError(f"{PARAMS}: {key}: expected one of {list(choices)}, got {value!r}")
    return value


def num_probes(params):
    return _positive_int(_get(params, "num_probes"), "num_probes")


def device(params):
    return _choice(_get(params, "device"), "device", DEVICES)


def _name_list(params, key):
    names = _get(params, key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ProbegenError(f"{PARAMS}: {key}: expected a non-empty list of names, got {names!r}")
    return names


def zoo_names(params):
    names = _name_list(params, "zoos")
    known = sorted(_get(params, "zoo"))
    for name in names:
        if name not in known:
            raise ProbegenError(f"{PARAMS}: zoos: unknown zoo {name!r}; define zoo.{name} or use one of {known}")
    return names


def method_names(params, kind):
    from probegen.methods import METHODS  # the registry knows each method's kind

    names = _name_list(params, f"methods.{kind}")
    for name in names:
        if name not in METHODS:
            raise ProbegenError(f"{PARAMS}: methods.{kind}: unknown method {name!r}; known: {sorted(METHODS)}")
        if METHODS[name].kind != kind:
            raise ProbegenError(f"{PARAMS}: methods.{kind}: {name!r} is a {METHODS[name].kind} method")
    return names


def seeds(params):
    values = _get(params, "seeds")
    if not isinstance(values, list) or not values:
        raise ProbegenError(f"{PARAMS}: seeds: expected a non-empty list of integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ProbegenError(f"{PARAMS}: seeds: expected non-negative integers, got {v!r}")
    return values


@dataclass(frozen=True)
class ZooConfig:
    name: str
    source: str
    format: str
    nonfinite: str = "error"
    url: str | None = None
    sha256: str | None = None
    final_step: int | None = 86
    build: dict = field(default_factory=dict)


def zoo_config(params, name):
    key = f"zoo.{name}"
    if name not in (params.get("zoo") or {}):
        raise ProbegenError(f"{PARAMS}: {key}: unknown zoo {name!r}; known: {sorted(params.get('zoo') or {})}")
    fetch, pack = dict(_get(params, f"{key}.fetch")), dict(_get(params, f"{key}.pack"))
    source = _choice(fetch.pop("source", None), f"{key}.fetch.source", SOURCES)
    fmt = _choice(pack.get("format"), f"{key}.pack.format", FORMATS)
    nonfinite = _choice(pack.get("nonfinite", "error"), f"{key}.pack.nonfinite", ("error", "drop"))
    final_step = pack.get("final_step", 86)  # null = each run's last checkpoint (the embedded zoo)
    if fmt == "small_cnn_zoo" and final_step is not None:
        final_step = _positive_int(final_step, f"{key}.pack.final_step")
    if source == "embedded":
        return ZooConfig(name, source, fmt, nonfinite, final_step=final_step, build=_build_args(name, fmt, fetch))
    where = "url" if source == "url" else "path"
    url = fetch.get(where)
    if not isinstance(url, str) or not url:
        raise ProbegenError(f"{PARAMS}: {key}.fetch.{where}: expected a URL or path, got {url!r}")
    sha = fetch.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ProbegenError(f"{PARAMS}: {key}.fetch.sha256: expected 64 hex digits or null, got {sha!r}")
    return ZooConfig(name, source, fmt, nonfinite, url=url, sha256=sha, final_step=final_step)


def _build_args(name, fmt, fetch):
    """The embedded builder's keyword arguments: positive integers, a positive lr, any integer seed."""
    if EMBEDDED_ZOOS.get(name) != fmt:
        raise ProbegenError(f"{PARAMS}: zoo.{name}: embedded zoos are {EMBEDDED_ZOOS}, got {name!r} with {fmt!r}")
    for k, v in fetch.items():
        if k == "lr":
            _positive_float(v, f"zoo.{name}.fetch.lr")
        elif k == "seed":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ProbegenError(f"{PARAMS}: zoo.{name}.fetch.seed: expected an integer, got {v!r}")
        else:
            _positive_int(v, f"zoo.{name}.fetch.{k}")
    return fetch


@dataclass(frozen=True)
class SplitConfig:
    kind: str
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    url: str | None = None
    sha256: str | None = None


def split_config(params, name):
    key = f"split.{name}"
    cfg = (params.get("split") or {}).get(name) or {"kind": "deterministic"}
    kind = _choice(cfg.get("kind"), f"{key}.kind", SPLIT_KINDS)
    if kind == "deterministic":
        val = _positive_float(cfg.get("val", 0.1), f"{key}.val", allow_zero=True)
        test = _positive_float(cfg.get("test", 0.2), f"{key}.test")
        if val + test >= 1:
            raise ProbegenError(f"{PARAMS}: {key}: val + test must be < 1, got {val} + {test}")
        return SplitConfig(kind, val, test, int(cfg.get("seed", 0)))
    if not isinstance(cfg.get("url"), str):
        raise ProbegenError(f"{PARAMS}: {key}.url: an official split needs the split file's URL or path")
    return SplitConfig(kind, url=cfg["url"], sha256=cfg.get("sha256"))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    eval_every: int


def train_config(params, zoo):
    key = f"train.{zoo}"
    cfg = _get(params, key)
    return TrainConfig(*(_positive_int(cfg.get(k), f"{key}.{k}") for k in ("epochs", "batch_size", "eval_every")))


def method_config(params, name):
    key = f"method.{name}"
    cfg = dict(_get(params, key))
    _choice(cfg.get("optimizer"), f"{key}.optimizer", OPTIMIZERS)
    _positive_float(cfg.get("lr"), f"{key}.lr")
    _positive_float(cfg.get("weight_decay", 0.0), f"{key}.weight_decay", allow_zero=True)
    if cfg.get("grad_clip") is not None:
        _positive_float(cfg["grad_clip"], f"{key}.grad_clip")
    for k in ("hidden", "layers", "latent_dim"):
        if k in cfg:
            _positive_int(cfg[k], f"{key}.{k}")
    return cfg


def dead_leaves_config(params):
    cfg = _get(params, "dead_leaves")
    return {k: _positive_int(cfg.get(k), f"dead_leaves.{k}") if k != "seed" else int(cfg.get(k, 0))
            for k in ("pool_size", "resolution", "seed")}
