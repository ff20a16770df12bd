"""fetch@<zoo>: the raw zoo in its published format -> data/raw/<zoo>/"""

import sys

from probegen import config
from probegen.errors import cli
from probegen.zoo.sources import fetch


@cli
def main(zoo):
    cfg = config.zoo_config(config.load_params(), zoo)
    summary = fetch(cfg, f"data/raw/{zoo}")
    print(f"fetch@{zoo}: {summary}")


if __name__ == "__main__":
    main(*sys.argv[1:])
