"""probe@<zoo>-<method>-<seed> and weights@<zoo>-<method>-<seed>: train one predictor on one zoo."""

import sys

from probegen import config, experiment
from probegen.errors import ProbegenError, cli


@cli
def main(zoo, method, seed):
    if not seed.isdigit():
        raise ProbegenError(f"seed: expected a non-negative integer, got {seed!r}")
    metrics = experiment.run(config.load_params(), zoo, method, int(seed))
    print(f"{zoo}/{method}-{seed}: test {metrics['metric']} {metrics['test']:.4f} "
          f"(val {metrics['val']:.4f} at step {metrics['best_step']}, {metrics['train_seconds']:.1f}s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
