"""One module per published zoo format. Each has `pack(raw_dir, out_dir, *, nonfinite, ...) -> spec`."""

import importlib

from probegen.errors import ProbegenError

FORMATS = {
    "dwsnets_inr": "probegen.zoo.formats.dwsnets_inr",      # DWSNets SIREN checkpoints (MNIST/FMNIST INRs)
    "small_cnn_zoo": "probegen.zoo.formats.small_cnn_zoo",  # weights.npy + metrics.csv.gz + layout.csv
    "wild_park": "probegen.zoo.formats.wild_park",          # <trial>/<checkpoint_N>/checkpoint.pt
}


def get_format(name):
    if name not in FORMATS:
        raise ProbegenError(f"unknown zoo format {name!r}; known: {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def family(name):
    """The architecture family (probegen/nets) of a format's models, known before anything is packed."""
    return get_format(name).SPEC["family"]


def pack_zoo(cfg, raw_dir, out_dir, progress=True):
    """Pack data/raw/<zoo> into data/zoos/<zoo> with the reader of cfg.format (a config.ZooConfig)."""
    reader = get_format(cfg.format)
    kwargs = {"nonfinite": cfg.nonfinite, "progress": progress}
    if cfg.format == "small_cnn_zoo":
        kwargs["final_step"] = cfg.final_step
    if cfg.label_file is not None:  # labels that live only in a split file (as neural-graphs reads MNIST's)
        from pathlib import Path

        from probegen.zoo.download import download, url_file_name
        from probegen.zoo.splits import SPLIT_DOWNLOADS

        dest = SPLIT_DOWNLOADS / f"{Path(out_dir).name}-{url_file_name(cfg.label_file)}"
        kwargs["label_file"] = download(cfg.label_file, dest, sha256=cfg.label_sha256, progress=False)["path"]
    return reader.pack(raw_dir, out_dir, **kwargs)
