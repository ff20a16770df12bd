"""The `probegen` command: every pipeline stage and the tools, one sub-command each.

    probegen --help                       the commands
    probegen train digits_inr probegen    one stage, as DVC runs it (python -m stages.train digits_inr probegen)
    probegen bench --scale full           the benchmarks

Each stage command reads params.yaml in the current folder once, validates what it reads (one line naming a
bad key), and calls the library. Stage scripts in stages/ are `stage("<command>")`: the same parser, so
`--help` prints the usage and a wrong argument exits 2 with a usage line, as any command-line tool does.
"""

import argparse
import sys

from probegen.errors import ProbegenError, cli

COMMANDS = {}  # name -> (function, help, [argument names])


def command(name, help, *args):
    def deco(fn):
        COMMANDS[name] = (fn, help, args)
        return fn
    return deco


def _params():
    from probegen import config
    return config, config.load_params()


# ------------------------------------------------------------------------------------------------ stages


@command("check", "check: validate params.yaml before any other stage runs, fingerprint the zoos' sources "
                  "-> data/checked/")
def check():
    import json

    from probegen.io import atomic_dir
    from probegen.zoo.sources import fingerprint
    config, params = _params()
    notes = config.check_params(params)
    with atomic_dir("data/checked") as out:
        (out / "params.ok").write_text("params.yaml checked\n")  # constant: its rerun invalidates nothing
        for zoo in config.zoo_names(params):
            source = fingerprint(config.zoo_config(params, zoo))  # changes only when the zoo's source does
            (out / f"source-{zoo}.json").write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")
    for note in notes:
        print(f"check: {note}")
    print("check: params.yaml is valid")


@command("fetch", "fetch@<zoo>: the raw zoo in its published format -> data/raw/<zoo>/", "zoo")
def fetch(zoo):
    import time

    from probegen.io import write_json
    from probegen.zoo.sources import fetch as fetch_zoo
    config, params = _params()
    t0 = time.perf_counter()
    summary = fetch_zoo(config.zoo_config(params, zoo), f"data/raw/{zoo}")
    write_json(f".probegen/logs/fetch-{zoo}.json", {"seconds": time.perf_counter() - t0})  # not an output
    print(f"fetch@{zoo}: {summary}")


@command("pack", "pack@<zoo>: data/raw/<zoo>/ -> data/zoos/<zoo>/ (ragged float32 weights, labels, meta, spec)",
         "zoo")
def pack(zoo):
    from probegen.zoo.formats import pack_zoo
    config, params = _params()
    spec = pack_zoo(config.zoo_config(params, zoo), f"data/raw/{zoo}", f"data/zoos/{zoo}")
    print(f"pack@{zoo}: {spec['num_models']} models, {spec['dropped_nonfinite']} dropped as non-finite")


@command("split", "split@<zoo>: data/zoos/<zoo>/ -> data/splits/<zoo>.json (train / val / test rows)", "zoo")
def split(zoo):
    from probegen.zoo.splits import build_split
    config, params = _params()
    sizes = build_split(config.split_config(params, zoo), f"data/zoos/{zoo}", f"data/splits/{zoo}.json")
    print(f"split@{zoo}: {sizes}")


@command("render-probes", "render_probes: the Dead-Leaves pool -> data/probes/dead_leaves.npy")
def render_probes():
    from probegen.io import write_npy
    from probegen.probes.dead_leaves import render
    config, params = _params()
    cfg = config.dead_leaves_config(params)
    pool = render(cfg["pool_size"], resolution=cfg["resolution"], seed=cfg["seed"])
    write_npy("data/probes/dead_leaves.npy", pool)
    print(f"render_probes: {pool.shape}")


@command("train", "probe@ / weights@<zoo>-<method>: train every seed -> models/<zoo>/<method>/", "zoo", "method")
def train(zoo, method):
    from probegen import experiment
    config, params = _params()
    runs = experiment.run(params, zoo, method)
    if not runs:
        print(f"{zoo}/{method}: skipped ({experiment.skip_reason(zoo, method)})")
    for m in runs:
        print(f"{zoo}/{method}-{m['seed']}: test {m['metric']} {m['test']:.4f} "
              f"(val {m['val']:.4f} at step {m['best_step']} of {m['steps']})")


@command("localize", "localize@<zoo>: path patching on the trained prober -> metrics/localize/, plots/localize/",
         "zoo")
def localize(zoo):
    from probegen.patching.probers import LocalizeConfig, localize_stage
    config, params = _params()
    print(localize_stage(zoo, LocalizeConfig.from_params(params.get("localize")), config.method_names(params, "probe")))


@command("induction", "induction: path patching on trained induction-head transformers -> metrics/induction.json")
def induction():
    from probegen.patching.induction import InductionConfig, run_induction
    _, params = _params()
    run_induction(InductionConfig.from_params(params.get("induction")), "metrics/induction.json", "plots/induction.png")


@command("aggregate", "aggregate: the summary over zoos x methods x seeds -> metrics/summary.*, plots/summary/")
def aggregate():
    from probegen.aggregate import aggregate as run_aggregate
    config, params = _params()
    methods = config.method_names(params, "probe") + config.method_names(params, "weights")
    summary = run_aggregate(config.zoo_names(params), methods, config.seeds(params))
    for zoo, by_method in summary.items():
        for method, r in by_method.items():
            if r.get("skipped"):
                print(f"{zoo:12s} {method:10s} skipped: {r['skipped']}")
            else:
                print(f"{zoo:12s} {method:10s} {r['metric']}: {r['test_mean']:.4f} ± {r['test_std']:.4f}")


@command("gpt2-numbers", "gpt2_numbers: the path patching paper's GPT-2 experiment; reads <folder>/params.yaml, "
                         "writes <folder>/metrics/ and <folder>/plots/ (needs GPT-2's weights)", "folder")
def gpt2_numbers(folder):
    from pathlib import Path

    from probegen import config
    from probegen.patching.gpt2_numbers import NumbersConfig, load_gpt2, run_gpt2_numbers
    from probegen.training import resolve_device

    folder = Path(folder)
    cfg = NumbersConfig.from_params(config.load_params(folder / "params.yaml").get("gpt2_numbers"))
    model, tokenizer = load_gpt2(cfg.model, resolve_device(cfg.device))
    run_gpt2_numbers(cfg, model, tokenizer, folder / "metrics/gpt2_numbers.json", folder / "plots/gpt2_numbers.png")


@command("compare-k", "plot the probing methods' test metric against K over this project's DVC experiments "
                      "-> plots/compare/metric_vs_k.{png,pdf}")
def compare_k():
    from probegen.compare import compare_k as plot_k
    base, points = plot_k(".")
    for zoo, by_method in points.items():
        for method, ks in by_method.items():
            print(f"{zoo:12s} {method:10s} " + "  ".join(f"K={k}: {m:.4f}" for k, (m, _) in sorted(ks.items())))
    print(f"wrote {base}.png, {base}.pdf")


# ------------------------------------------------------------------------------------------------- tools


def _forward(module, name):
    """A tool with its own argparse main(argv): the rest of the command line goes to it."""
    def run(rest):
        import importlib
        sys.argv = [f"probegen {name}", *rest]
        return importlib.import_module(module).main(rest)
    return run


TOOLS = {"bench": ("probegen.bench", "the benchmarks (python -m probegen.bench --help)"),
         "plots": ("probegen.dvcplots", "write the offline `dvc plots show` template")}


# --------------------------------------------------------------------------------------------------- main


def _add_arguments(p, names):
    for arg in names:
        p.add_argument(arg)


def parser(prog="probegen"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help, args) in COMMANDS.items():
        _add_arguments(sub.add_parser(name, help=help, description=help), args)
    for name, (_, help) in TOOLS.items():
        sub.add_parser(name, help=help, add_help=False)
    return p


def main(argv=None):
    """`probegen <command> ARGS`; --help lists the commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _forward(TOOLS[argv[0]][0], argv[0])(argv[1:])
    args = parser().parse_args(argv)  # --help: exit 0; a wrong argument: usage line, exit 2
    fn, _, names = COMMANDS[args.command]
    return run_stage(fn, args.command, [getattr(args, n) for n in names])


def run_stage(fn, name, args):
    """Run one command under the stage discipline of probegen.errors.cli (one error line, lock, signals),
    with the training processes' memory policy (probegen.runtime)."""
    from probegen.runtime import keep_freed_memory

    keep_freed_memory()
    return cli(fn, stage=".".join([name, *args]))(*args)


def stage(name):
    """Entry point of stages/<script>.py, run as `python -m stages.<script> ARGS` from the project root (so
    that `import probegen` is this checkout's code, the code DVC hashed): the command `name`, parsed with
    the same arguments and --help as `probegen <name>`."""
    fn, help, names = COMMANDS[name]
    script = getattr(sys.modules["__main__"], "__spec__", None)
    p = argparse.ArgumentParser(prog=f"python -m {script.name}" if script else name, description=help)
    _add_arguments(p, names)
    args = p.parse_args()
    return run_stage(fn, name, [getattr(args, n) for n in names])


if __name__ == "__main__":
    sys.exit(main())
