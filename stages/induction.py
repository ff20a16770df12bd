"""induction: train tiny attention-only transformers and path-patch their induction mechanism.

Reads params.yaml `induction` (keys and defaults: probegen.patching.induction.InductionConfig).
Writes metrics/induction.json and plots/induction.png.
"""

from probegen import config
from probegen.errors import cli
from probegen.patching.induction import InductionConfig, run_induction


@cli
def main():
    section = config.load_params().get("induction") or {}
    run_induction(InductionConfig.from_params(section), "metrics/induction.json", "plots/induction.png")


if __name__ == "__main__":
    main()
