"""localize@<zoo>: path patching on the trained ProbeGen predictor: which probes and which layers of the probed
networks carry its prediction.

Reads params.yaml `localize` (keys and defaults: probegen.patching.probers.LocalizeConfig).
Writes metrics/localize/<zoo>.json and plots/localize/<zoo>/.
"""

import sys

from probegen import config
from probegen.errors import ProbegenError, cli
from probegen.patching.probers import LocalizeConfig, run_localize


@cli
def main(*args):
    if len(args) != 1:
        raise ProbegenError("usage: python stages/localize.py <zoo>")
    cfg = LocalizeConfig.from_params(config.load_params().get("localize"))
    out = run_localize(args[0], cfg.seed, n_pairs=cfg.n_pairs, n_boot=cfg.n_boot, target=cfg.target,
                       top_probes=cfg.top_probes)
    layers = ", ".join(f"{r['layer']} {r['explained']:.2f}" for r in out["layers"]["aligned"]["only"]
                       if r["explained"] is not None)
    print(f"localize {args[0]}: {out['probes']['smallest_size']} of {out['num_probes']} probes explain "
          f">= {cfg.target:.0%}; single layers from the reference: {layers} ({out['seconds']:.1f}s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
