"""probegen: ProbeGen and weight-space baselines as a DVC pipeline, plus path patching.

From Python: probegen.load_zoo, load_split, build_method, train, train_seeds, load_trained, localize (see
probegen/api.py; paths are relative to the project root you give), and probegen.patching for the engine.
They are imported on first use, so `import probegen` (and every stage's --help) stays instant.
"""

__version__ = "0.1.0"

API = ("load_zoo", "load_split", "build_method", "train", "train_seeds", "load_trained", "localize")


def __getattr__(name):
    if name in API:
        from probegen import api

        return getattr(api, name)
    raise AttributeError(f"module 'probegen' has no attribute {name!r}")
