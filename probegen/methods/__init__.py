"""Every predictor behind one interface, by name. Adding a method = one new module probegen/methods/<name>.py
that registers itself with @register("<name>", kind), plus its params.yaml entry `method.<name>`. Modules are
discovered, not listed, so adding one changes no file that other methods' DVC stages depend on; and a
module is imported the first time its name is looked up in METHODS, so a stage imports only the method it
trains (torch_geometric, for one, only for the neural-graph baselines).

    build_method(name, zoo, cfg, num_probes=..., probe_pool=..., seed=...) -> Method (an nn.Module)

`cfg` is the method's params.yaml entry: the method reads its own keys (Method.defaults, see each module)
and ignores the training keys that probegen.training reads; any other key is an error (a typo otherwise
silently falls back to a default).
"""

import importlib
import pkgutil

import torch

from probegen.errors import ProbegenError

KINDS = ("probe", "weights")
TRAIN_KEYS = ("optimizer", "lr", "weight_decay", "grad_clip")  # read by probegen.training
# ... and per_zoo, read by probegen.config (method.<name>.per_zoo.<zoo>: settings for one zoo)
CONFIG_KEYS = TRAIN_KEYS + ("per_zoo",)
SHARED = ("base", "classifier")  # what methods import; every other module here is one method


def available():
    """Names of the method modules (= the methods), found without importing them."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__)
                  if info.name not in SHARED and not info.name.startswith("_"))


class _Registry(dict):
    """name -> method class. Looking a name up imports its module; iterating imports them all."""

    def _load(self, name):
        if not dict.__contains__(self, name) and name in available():
            importlib.import_module(f"{__name__}.{name}")  # registers itself

    def __getitem__(self, name):
        self._load(name)
        return dict.__getitem__(self, name)

    def __contains__(self, name):
        self._load(name)
        return dict.__contains__(self, name)

    def _all(self):
        for name in available():
            self._load(name)
        return self

    def __iter__(self):
        return dict.__iter__(self._all())

    def __len__(self):
        return dict.__len__(self._all())

    def keys(self):
        return dict.keys(self._all())

    def items(self):
        return dict.items(self._all())

    def values(self):
        return dict.values(self._all())


METHODS = _Registry()


def register(name, kind):
    if kind not in KINDS:
        raise ValueError(f"method kind must be one of {KINDS}, got {kind!r}")

    def deco(cls):
        module = cls.__module__
        if module.startswith(f"{__name__}.") and module.rsplit(".", 1)[1] != name:
            # DVC stages depend on probegen/methods/<name>.py: the file must be named after the method
            raise ValueError(f"method {name!r} must live in probegen/methods/{name}.py, not {module}")
        cls.name, cls.kind = name, kind
        dict.__setitem__(METHODS, name, cls)
        return cls
    return deco


def method_cfg(name, cfg):
    """The method's own settings: its defaults overridden by cfg. Unknown keys are an error (a typo would
    otherwise silently fall back to a default), and so is a value whose type differs from its default's."""
    cls = METHODS[name]
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(cls.defaults) - set(CONFIG_KEYS))
    if unknown:
        raise ProbegenError(f"method.{name}: unknown key {unknown[0]!r}; {name} reads {sorted(cls.defaults)} "
                            f"and the training keys {list(TRAIN_KEYS)}")
    own = {k: cfg.get(k, v) for k, v in cls.defaults.items()}
    for k, default in cls.defaults.items():
        if not _same_kind(own[k], default):
            raise ProbegenError(f"method.{name}.{k}: expected {_kind(default)}, got {own[k]!r}")
    return own


def _kind(default):
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a non-negative integer"
    if isinstance(default, float):
        return "a number"
    return f"a {type(default).__name__}"


def _same_kind(value, default):
    """Does value fit a key whose default is `default`? (None defaults accept anything: they mean 'auto'.)"""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def build_method(name, zoo, cfg, *, num_probes, probe_pool=None, seed=0):
    """A freshly initialised method for this zoo; initialisation is seeded (torch.manual_seed(seed)).
    A method that does not apply to the zoo's architecture family says so in one line."""
    if name not in METHODS:
        raise ProbegenError(f"unknown method {name!r}; known: {available()}")
    own = method_cfg(name, cfg)
    reason = METHODS[name].why_unsupported(zoo.family)
    if reason:
        raise ProbegenError(f"method {name!r}: cannot run on the {zoo.family} family ({reason})")
    torch.manual_seed(seed)
    return METHODS[name](zoo, own, num_probes=num_probes, probe_pool=probe_pool)


