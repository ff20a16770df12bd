"""params.yaml -> small validated values. Each stage reads params once, through these accessors.

Every accessor checks the keys it returns and raises ProbegenError with one line naming the key:
    params.yaml: num_probes: expected a positive integer, got 0

`check_params` validates everything every stage reads, at once; the pipeline's first stage runs it, so a bad
value stops `dvc repro` before any stage has removed its previous outputs.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from probegen.errors import ProbegenError

PARAMS = "params.yaml"
SOURCES = ("embedded", "url", "path")
EMBEDDED_ZOOS = {"digits_inr": "dwsnets_inr", "digits_cnn": "small_cnn_zoo"}
OPTIMIZERS = ("adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULE_KEYS = ("epochs", "batch_size", "eval_every")
MAX_NUM_PROBES = 1 << 16  # far above any published K (64, 128); beyond it the classifier alone needs GBs


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


# ------------------------------------------------------------------------------------------- value checks


def _fail(key, expected, value):
    raise ProbegenError(f"{PARAMS}: {key}: expected {expected}, got {value!r}")


def _get(params, dotted):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ProbegenError(f"{PARAMS}: {dotted}: missing")
        node = node[part]
    return node


def _section(params, dotted, default=None):
    """A mapping under `dotted` (a copy); `default` when absent and a default is given."""
    try:
        value = _get(params, dotted)
    except ProbegenError:
        if default is None:
            raise
        return dict(default)
    if value is None and default is not None:
        return dict(default)
    if not isinstance(value, dict):
        _fail(dotted, "a mapping of settings", value)
    return dict(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value, key, low=None):
    if not _is_int(value) or (low is not None and value < low):
        _fail(key, "an integer" if low is None else f"an integer >= {low}", value)
    return value


def _positive_int(value, key):
    if not _is_int(value) or value <= 0:
        _fail(key, "a positive integer", value)
    return value


def _number(value, key, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 or allow_zero and value == 0)
    if not ok:
        _fail(key, "a non-negative number" if allow_zero else "a positive number", value)
    return float(value)


def _choice(value, key, choices):
    if value not in choices:
        _fail(key, f"one of {list(choices)}", value)
    return value


# ------------------------------------------------------------------------------------------ top-level keys


def num_probes(params):
    value = _get(params, "num_probes")
    if not _is_int(value) or not 0 < value <= MAX_NUM_PROBES:
        _fail("num_probes", f"a positive integer (at most {MAX_NUM_PROBES})", value)
    return value


def device(params):
    return _choice(_get(params, "device"), "device", DEVICES)


def _name_list(params, key):
    names = _get(params, key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        _fail(key, "a non-empty list of names", names)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ProbegenError(f"{PARAMS}: {key}: {dup[0]!r} is listed twice")
    return names


def zoo_names(params):
    names = _name_list(params, "zoos")
    known = sorted(_section(params, "zoo"))
    for name in names:
        if name not in known:
            raise ProbegenError(f"{PARAMS}: zoos: unknown zoo {name!r}; define zoo.{name} or use one of {known}")
    return names


def method_names(params, kind):
    from probegen.methods import METHODS, available  # the registry knows each method's kind

    names = _name_list(params, f"methods.{kind}")
    for name in names:
        if name not in METHODS:
            raise ProbegenError(f"{PARAMS}: methods.{kind}: unknown method {name!r}; known: {available()}")
        if METHODS[name].kind != kind:
            raise ProbegenError(f"{PARAMS}: methods.{kind}: {name!r} is a {METHODS[name].kind} method")
    return names


def seeds(params):
    values = _get(params, "seeds")
    if not isinstance(values, list) or not values:
        _fail("seeds", "a non-empty list of integers", values)
    for v in values:
        _int(v, "seeds", low=0)
    if len(set(values)) != len(values):
        raise ProbegenError(f"{PARAMS}: seeds: {values} repeats a seed (the same run would be averaged twice)")
    return values


# ------------------------------------------------------------------------------------------------- zoos


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
    label_file: str | None = None  # dwsnets_inr: a split file carrying labels, for checkpoints that have none
    label_sha256: str | None = None


def zoo_config(params, name):
    from probegen.zoo.formats import FORMATS

    key = f"zoo.{name}"
    if name not in _section(params, "zoo"):
        raise ProbegenError(f"{PARAMS}: {key}: unknown zoo {name!r}; known: {sorted(_section(params, 'zoo'))}")
    fetch, pack = _section(params, f"{key}.fetch"), _section(params, f"{key}.pack")
    source = _choice(fetch.pop("source", None), f"{key}.fetch.source", SOURCES)
    fmt = _choice(pack.get("format"), f"{key}.pack.format", sorted(FORMATS))
    nonfinite = _choice(pack.get("nonfinite", "error"), f"{key}.pack.nonfinite", ("error", "drop"))
    final_step = pack.get("final_step", 86)  # null = each run's last checkpoint (the embedded zoo)
    if fmt == "small_cnn_zoo" and final_step is not None:
        final_step = _positive_int(final_step, f"{key}.pack.final_step")
    labels = {"label_file": pack.get("label_file"),
              "label_sha256": _sha256(pack.get("label_sha256"), f"{key}.pack.label_sha256")}
    if labels["label_file"] is not None and (fmt != "dwsnets_inr" or not isinstance(labels["label_file"], str)):
        _fail(f"{key}.pack.label_file", "a split file URL or path (dwsnets_inr zoos only) or null",
              labels["label_file"])
    if source == "embedded":
        return ZooConfig(name, source, fmt, nonfinite, final_step=final_step, build=_build_args(name, fmt, fetch),
                         **labels)
    where = "url" if source == "url" else "path"
    url = fetch.get(where)
    if not isinstance(url, str) or not url:
        _fail(f"{key}.fetch.{where}", "a URL or path", url)
    return ZooConfig(name, source, fmt, nonfinite, url=url, sha256=_sha256(fetch.get("sha256"), f"{key}.fetch"),
                     final_step=final_step, **labels)


def _sha256(sha, key):
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha.lower())):
        _fail(key if key.endswith("sha256") else f"{key}.sha256", "64 hex digits or null", sha)
    return sha


def _build_args(name, fmt, fetch):
    """The embedded builder's keyword arguments: positive integers, a positive lr, any integer seed."""
    if EMBEDDED_ZOOS.get(name) != fmt:
        raise ProbegenError(f"{PARAMS}: zoo.{name}: embedded zoos are {EMBEDDED_ZOOS}, got {name!r} with {fmt!r}")
    for k, v in fetch.items():
        if k == "lr":
            _number(v, f"zoo.{name}.fetch.lr")
        elif k == "seed":
            _int(v, f"zoo.{name}.fetch.seed")
        else:
            _positive_int(v, f"zoo.{name}.fetch.{k}")
    return fetch


def family_of(params, zoo):
    """The architecture family of a configured zoo, known from its format before anything is built."""
    from probegen.zoo.formats import family

    return family(zoo_config(params, zoo).format)


# ----------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitConfig:
    kind: str
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    url: str | None = None
    sha256: str | None = None


def split_config(params, name):
    from probegen.zoo.splits import KINDS

    key = f"split.{name}"
    cfg = _section(params, key, default={"kind": "deterministic"}) if name in _section(params, "split", {}) \
        else {"kind": "deterministic"}
    kind = _choice(cfg.get("kind"), f"{key}.kind", KINDS)
    if kind == "deterministic":
        val = _number(cfg.get("val", 0.1), f"{key}.val", allow_zero=True)
        test = _number(cfg.get("test", 0.2), f"{key}.test")
        if val + test >= 1:
            raise ProbegenError(f"{PARAMS}: {key}: val + test must be < 1, got {val} + {test}")
        return SplitConfig(kind, val, test, _int(cfg.get("seed", 0), f"{key}.seed"))
    if not isinstance(cfg.get("url"), str):
        raise ProbegenError(f"{PARAMS}: {key}.url: an official split needs the split file's URL or path")
    return SplitConfig(kind, url=cfg["url"], sha256=_sha256(cfg.get("sha256"), key))


# --------------------------------------------------------------------------------------- training, methods


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    eval_every: int


def per_zoo(params, method, zoo):
    """method.<method>.per_zoo.<zoo>: what (zoo, method) uses instead of the method's reference settings, for
    any of its keys and the schedule keys (e.g. the embedded zoos train smaller NFNs for fewer epochs)."""
    key = f"method.{method}.per_zoo"
    overrides = _section(params, f"method.{method}").get("per_zoo") or {}
    if not isinstance(overrides, dict):
        _fail(key, "a mapping {zoo: {setting: value}}", overrides)
    override = overrides.get(zoo) or {}
    if not isinstance(override, dict):
        _fail(f"{key}.{zoo}", "a mapping of settings", override)
    return override


def train_config(params, zoo, method=None):
    """The schedule of (zoo, method): train.<zoo>, overridden by the schedule keys of
    method.<method>.per_zoo.<zoo> (neural-graphs trains its baselines with other batch sizes and epochs than
    ProbeGen)."""
    key = f"train.{zoo}"
    cfg = _section(params, key)
    if method is not None:
        override = {k: v for k, v in per_zoo(params, method, zoo).items() if k in SCHEDULE_KEYS}
        cfg, key = {**cfg, **override}, (f"method.{method}.per_zoo.{zoo}" if override else key)
    return TrainConfig(*(_positive_int(cfg.get(k), f"{key}.{k}") for k in SCHEDULE_KEYS))


def method_config(params, name, zoo=None):
    """method.<name> (with its per_zoo.<zoo> overrides when a zoo is given): the training keys checked here,
    the method's own keys against its defaults; the schedule keys and per_zoo itself are left out."""
    from probegen.methods import METHODS, method_cfg

    key = f"method.{name}"
    cfg = _section(params, key)
    overrides = cfg.pop("per_zoo", None) or {}
    if zoo is not None:
        cfg.update({k: v for k, v in per_zoo(params, name, zoo).items() if k not in SCHEDULE_KEYS})
        key = f"{key} (per_zoo.{zoo})" if zoo in overrides else key
    _choice(cfg.get("optimizer"), f"{key}.optimizer", OPTIMIZERS)
    _number(cfg.get("lr"), f"{key}.lr")
    _number(cfg.get("weight_decay", 0.0), f"{key}.weight_decay", allow_zero=True)
    if cfg.get("grad_clip") is not None:
        _number(cfg["grad_clip"], f"{key}.grad_clip")
    if name in METHODS:
        method_cfg(name, cfg)  # unknown keys and wrongly typed values, one line each
    return cfg


def checkpoint_config(params):
    """checkpoint.every_steps / every_seconds (0 = off). Read by the training stages but not listed in their
    DVC params on purpose: how often a run saves itself does not change its results."""
    cfg = _section(params, "checkpoint", default={"every_steps": 0, "every_seconds": 0})
    return (_int(cfg.get("every_steps", 0), "checkpoint.every_steps", low=0),
            _number(cfg.get("every_seconds", 0), "checkpoint.every_seconds", allow_zero=True))


def dead_leaves_config(params):
    cfg = _section(params, "dead_leaves")
    return {"pool_size": _positive_int(cfg.get("pool_size"), "dead_leaves.pool_size"),
            "resolution": _positive_int(cfg.get("resolution"), "dead_leaves.resolution"),
            "seed": _int(cfg.get("seed", 0), "dead_leaves.seed")}


def dataclass_section(cls, section, key):
    """A params section (a dict or None) -> cls(**section), with one line `params <key>.<name>: ...` for an
    unknown key or a value of the wrong type (a float field takes an int; no field takes a bool for a number).
    The caller checks ranges."""
    section = dict(section or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ProbegenError(f"params {key}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    for name, value in section.items():
        want = fields[name].type
        if not isinstance(value, (int, float) if want is float else want) or isinstance(value, bool):
            raise ProbegenError(f"params {key}.{name}: expected {want.__name__}, got {value!r}")
    return cls(**section)


# ------------------------------------------------------------------------------------------ all at once


def check_params(params):
    """Validate every key the pipeline's stages read -> a list of notes (e.g. method x zoo pairs that do not
    apply and will be skipped). Raises one ProbegenError line for the first bad value."""
    from probegen.methods import METHODS
    from probegen.patching.induction import InductionConfig
    from probegen.patching.probers import LocalizeConfig

    num_probes(params)
    device(params)
    seeds(params)
    methods = method_names(params, "probe") + method_names(params, "weights")
    notes = []
    for zoo in zoo_names(params):
        zoo_config(params, zoo)
        split_config(params, zoo)
        family = family_of(params, zoo)
        for method in methods:
            method_config(params, method, zoo)
            train_config(params, zoo, method)
            reason = METHODS[method].why_unsupported(family)
            if reason:
                notes.append(f"{method} on {zoo}: skipped ({reason})")
    dead_leaves_config(params)
    checkpoint_config(params)
    InductionConfig.from_params(params.get("induction"))
    LocalizeConfig.from_params(params.get("localize"))
    return notes
