"""Where a raw zoo comes from: built here (embedded), downloaded (url), or the researcher's own (path).

`fingerprint(cfg)` says what a zoo's fetch reads, cheaply: the builder's params, the URL and pinned
sha256, or, for your own zoo, every file's path, size and modification time. The pipeline's `check` stage
writes it to data/checked/source-<zoo>.json on every `dvc repro`, and fetch@<zoo> depends on that file,
so editing your zoo in place reruns fetch@ (and what depends on it), and nothing else does.
"""

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from probegen.errors import ProbegenError

DOWNLOADS = Path("data/downloads")  # archives are kept here, so re-packing never re-downloads


def fetch(cfg, raw_dir):
    """Write the zoo of cfg (a config.ZooConfig) in its published on-disk format under raw_dir."""
    from probegen.zoo import download

    if cfg.source == "embedded":
        from probegen.zoo.embedded import digits_cnn, digits_inr

        builders = {"digits_inr": digits_inr.build, "digits_cnn": digits_cnn.build}
        return builders[cfg.name](raw_dir, **cfg.build)
    return download.fetch_zoo(cfg.url, raw_dir, sha256=cfg.sha256, cache_dir=DOWNLOADS)


def fingerprint(cfg):
    """A small JSON-able description of everything fetch@ reads for this zoo (see the module docstring)."""
    if cfg.source == "embedded":
        return {"source": "embedded", "build": cfg.build}
    if cfg.source == "url":
        return {"source": "url", "url": cfg.url, "sha256": cfg.sha256}
    path = local_path(cfg.url)
    return {"source": "path", "path": str(path.resolve()), "sha256": cfg.sha256, "files": _listing_hash(path)}


def local_path(url):
    """A `source: path` location (a path or a file:// URL) -> Path; it must exist."""
    path = Path(urlparse(url).path if url.startswith("file://") else url).expanduser()
    if not path.exists():
        raise ProbegenError(f"{url}: your zoo is not there (zoo.<name>.fetch.path)")
    return path


def _listing_hash(path):
    """sha256 over (relative path, size, mtime) of every file below `path` (or of the file itself): any edit,
    addition or removal changes it. Links are listed by their target, not followed, so a loop cannot hang."""
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(folder, d))):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                h.update(f"{rel}\0->{os.readlink(full)}\n".encode())
            else:
                st = os.stat(full)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
