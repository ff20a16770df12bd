"""The library from Python (a notebook, a script): every path is relative to a project `root` that you pass,
never the current folder. `import probegen` makes these available as probegen.<name>.

    zoo = load_zoo("digits_inr", root)                     a packed zoo (data/zoos/<zoo>/)
    split = load_split("digits_inr", root)                 its train / val / test rows (data/splits/<zoo>.json)
    method = build_method("probegen", zoo, {}, num_probes=64, seed=0)
    result = train(method, zoo, split, epochs=2, ...)      the one training loop (probegen.training)
    predictor, zoo, run = load_trained(root, "digits_inr", "probegen", seed=0)   a trained run, rebuilt
    report = localize(root, "digits_inr", method="probegen", seed=0, n_pairs=64)  path patching on it
"""

from pathlib import Path

from probegen.methods import build_method  # noqa: F401 (re-exported)
from probegen.training import train, train_seeds  # noqa: F401 (re-exported)


def load_zoo(name, root="."):
    from probegen.zoo.packed import load_packed

    return load_packed(Path(root) / f"data/zoos/{name}")


def load_split(name, root=".", num_models=None):
    from probegen.zoo.splits import load_split as load

    return load(Path(root) / f"data/splits/{name}.json", num_models=num_models)


def load_trained(root, zoo, method, seed=0):
    """(the trained method in eval mode, its packed zoo, the saved run) from models/<zoo>/<method>/seed-<s>.pt."""
    from probegen import saved
    from probegen.experiment import run_paths

    return saved.load_trained(run_paths(zoo, method, seed, root)["model"], root, zoo=zoo, method=method, seed=seed)


def localize(root, zoo, method="probegen", seed=0, n_pairs=256, n_boot=500, target=0.9, top_probes=8):
    """Path patching on a trained prober (see probegen.patching.probers): which probes and which layers of the
    probed networks carry its prediction. Writes metrics/localize/<zoo>.json and plots/localize/<zoo>/ under
    root and returns the analysis."""
    from probegen.patching.probers import run_localize

    return run_localize(zoo, seed, method=method, n_pairs=n_pairs, n_boot=n_boot, target=target,
                        top_probes=top_probes, root=root)
