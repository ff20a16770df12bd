"""Where a raw zoo comes from: built here (embedded), downloaded (url), or the researcher's own (path)."""

from pathlib import Path

from probegen.zoo import download
from probegen.zoo.embedded import digits_cnn, digits_inr

BUILDERS = {"digits_inr": digits_inr.build, "digits_cnn": digits_cnn.build}
DOWNLOADS = Path("data/downloads")  # archives are kept here, so re-packing never re-downloads


def fetch(cfg, raw_dir):
    """Write the zoo of cfg (a config.ZooConfig) in its published on-disk format under raw_dir."""
    if cfg.source == "embedded":
        return BUILDERS[cfg.name](raw_dir, **cfg.build)
    return download.fetch_zoo(cfg.url, raw_dir, sha256=cfg.sha256, cache_dir=DOWNLOADS)
