"""pack@<zoo>: data/raw/<zoo>/ -> data/zoos/<zoo>/ (weights.npy, offsets.npy, labels.npy, meta.csv, spec.json)"""

import sys

from probegen import config
from probegen.errors import cli
from probegen.zoo.formats import pack_zoo


@cli
def main(zoo):
    cfg = config.zoo_config(config.load_params(), zoo)
    spec = pack_zoo(cfg, f"data/raw/{zoo}", f"data/zoos/{zoo}")
    print(f"pack@{zoo}: {spec['num_models']} models, {spec['dropped_nonfinite']} dropped as non-finite")


if __name__ == "__main__":
    main(*sys.argv[1:])
