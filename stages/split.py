"""split@<zoo>: data/zoos/<zoo>/ -> data/splits/<zoo>.json ({train, val, test}: row indices)"""

import sys

from probegen import config
from probegen.errors import cli
from probegen.zoo.splits import build_split


@cli
def main(zoo):
    cfg = config.split_config(config.load_params(), zoo)
    sizes = build_split(cfg, f"data/zoos/{zoo}", f"data/splits/{zoo}.json")
    print(f"split@{zoo}: {sizes}")


if __name__ == "__main__":
    main(*sys.argv[1:])
