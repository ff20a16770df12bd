"""Stage induction: train tiny attention-only transformers and path-patch their induction mechanism.

Reads params.yaml -> induction (see probegen.patching.induction.InductionConfig for keys and defaults).
Writes metrics/induction.json and plots/induction.png.
"""

import argparse
from pathlib import Path

import yaml

from probegen.errors import ProbegenError, cli
from probegen.patching.induction import InductionConfig, run_induction


@cli
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/induction.json")
    ap.add_argument("--plot", default="plots/induction.png")
    args = ap.parse_args()
    params = {}
    if Path(args.params).exists():
        try:
            params = yaml.safe_load(Path(args.params).read_text()) or {}
        except yaml.YAMLError as err:
            raise ProbegenError(f"{args.params}: not valid YAML ({str(err).splitlines()[0]})") from None
    section = params.get("induction", {}) if isinstance(params, dict) else None
    if not isinstance(section, dict):
        raise ProbegenError(f"{args.params}: 'induction' must be a mapping")
    run_induction(InductionConfig.from_params(section), args.metrics, args.plot)


if __name__ == "__main__":
    main()
