"""Fetching a published zoo: a resumable, checksummed download, then a safe, atomic extraction.

    fetch_zoo(url, "data/raw/mnist_inr", sha256="...")

downloads the archive once into data/downloads/ (kept, so re-packing never downloads again) and unpacks
it into data/raw/mnist_inr/, which appears complete or not at all. A local path or file:// URL (a
researcher's own zoo, as an archive or an unpacked folder) is copied instead of downloaded.
"""

import errno
import gzip
import hashlib
import http.client
import json
import lzma
import os
import posixpath
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from probegen.errors import ProbegenError
from probegen.io import atomic_dir, write_json

USER_AGENT = "probegen-downloader"
TIMEOUT = 60  # seconds without data before a connection counts as dropped
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # transient server answers; any other error is final
# the archive is broken (truncated download, bad CRC, not an archive at all), as opposed to our refusals
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error,
                  gzip.BadGzipFile)
# Python >= 3.10.12 / 3.11.4 can also refuse special files and odd permissions while extracting tars
TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


# -----------------------------------------------------------------------------
# URLs

def direct_url(url):
    """Share links -> direct downloads: Dropbox `dl=0` -> `dl=1`; storage.cloud.google.com (asks for a
    Google login) -> the public storage.googleapis.com endpoint. Other URLs are returned unchanged."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.lower()
    if host in ("www.dropbox.com", "dropbox.com"):
        # keep every other parameter: newer `scl/fo/...` links need their `rlkey`
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
                 if k not in ("dl", "raw")]
        query.append(("dl", "1"))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    if host == "storage.cloud.google.com":
        return urllib.parse.urlunsplit(parts._replace(netloc="storage.googleapis.com"))
    return url


def local_path(url):
    """The local file a `file://` URL or a plain path names, or None for a network URL."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme in ("http", "https", "ftp"):
        return None
    return Path(url)  # no scheme (or a Windows drive letter): a path on this machine


def url_file_name(url):
    """The file name at the end of a URL's path, e.g. cnn_wild_park.zip."""
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(direct_url(url)).path))
    if not name:
        raise ProbegenError(f"{url}: cannot tell the archive's file name from the URL; set archive_name")
    return name


# -----------------------------------------------------------------------------
# download

def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(dest):
    return Path(dest).with_name(Path(dest).name + ".sha256.json")


def download(url, dest, *, sha256=None, retries=5, backoff=1.0, progress=True, chunk=1 << 20):
    """Download url to dest; returns {"path", "sha256", "size"}.

    Bytes go to `dest.part` first, which a later call (or a retry after a dropped connection) resumes
    with an HTTP Range request. dest appears only once complete and, when `sha256` is given, verified.
    Without a pinned sha256 the observed one is printed and recorded in `<dest>.sha256.json`.
    """
    url, dest = direct_url(str(url)), Path(dest)
    sha256 = sha256.lower() if sha256 else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and sha256 is None and _recorded_url(dest) not in (None, url):
        print(f"{dest}: cached from another URL; downloading again")
        dest.unlink()
    if dest.exists():
        observed = file_sha256(dest, chunk)
        if sha256 is None or observed == sha256:
            return _finish(url, dest, observed, sha256)
        print(f"{dest}: cached file has sha256 {observed}, expected {sha256}; downloading again")
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    src = local_path(url)
    if src is not None:
        _copy_local(src, part)
    else:
        _fetch_http(url, part, retries=retries, backoff=backoff, progress=progress, chunk=chunk)
    observed = file_sha256(part, chunk)
    if sha256 is not None and observed != sha256:
        part.unlink()  # a resumed download may have mixed two versions: never resume from it
        raise ProbegenError(f"{url}: sha256 mismatch for {dest.name}: expected {sha256}, "
                            f"got {observed}; the partial download was deleted")
    os.replace(part, dest)
    return _finish(url, dest, observed, sha256)


def _finish(url, dest, observed, sha256):
    size = dest.stat().st_size
    if sha256 is None:
        write_json(sidecar_path(dest), {"url": url, "sha256": observed, "size": size})
        print(f"{dest}: no sha256 pinned; observed sha256={observed} size={size} "
              f"(recorded in {sidecar_path(dest).name}; pin it to verify future downloads)")
    return {"path": str(dest), "sha256": observed, "size": size}


def _recorded_url(dest):
    try:
        return json.loads(sidecar_path(dest).read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None


def _copy_local(src, part):
    if not src.exists():
        raise ProbegenError(f"{src}: no such file")
    if src.is_dir():
        raise ProbegenError(f"{src}: is a folder, expected an archive file")
    shutil.copyfile(src, part)


def _fetch_http(url, part, *, retries, backoff, progress, chunk):
    """Fetch into `part`, resuming after dropped connections. Attempts that bring no new bytes count
    against `retries`; progress resets the count, so a long download over a flaky link still finishes."""
    best, failures = _size(part), 0
    while True:
        try:
            if _fetch_once(url, part, progress=progress, chunk=chunk):
                return
            error = "connection closed before the end of the file"
        except urllib.error.HTTPError as err:
            if err.code not in RETRY_HTTP:
                raise ProbegenError(f"{url}: HTTP {err.code} {err.reason}") from None
            error = f"HTTP {err.code} {err.reason}"
        except (OSError, http.client.HTTPException) as err:  # URLError, resets, timeouts
            error = f"{type(err).__name__}: {err}"
        if _size(part) > best:
            best, failures = _size(part), 0
        else:
            failures += 1
        if failures > retries:
            kept = f"; {_size(part)} bytes kept in {part.name}, rerun to resume" if _size(part) else ""
            raise ProbegenError(f"{url}: download failed after {retries} retries ({error}){kept}")
        time.sleep(backoff * 2 ** failures)


def _fetch_once(url, part, *, progress, chunk):
    """One request, appending to `part`. True when the file is complete."""
    have = _size(part)
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left past `have`: complete, or a stale longer file
            if _range_total(err.headers.get("Content-Range")) == have:
                return True
            part.unlink()
            return False
        raise
    with resp:
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range")
            total = _range_total(content_range)
            if _range_start(content_range) != have:  # not what we asked for: restart, never stitch
                part.unlink()
                return False
            mode = "ab"
        else:  # 200: the server ignored Range and sends the whole file
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        name = Path(urllib.parse.urlsplit(url).path).name or url
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=name, disable=not progress) as bar:
            while block := resp.read(chunk):
                f.write(block)
                bar.update(len(block))
    return total is None or _size(part) >= total


def _range_start(content_range):
    # "bytes 100-199/200" -> 100
    try:
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _range_total(content_range):
    # "bytes 100-199/200" or "bytes */200" -> 200 (None when unknown: "*")
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def _size(path):
    return path.stat().st_size if path.exists() else 0


# -----------------------------------------------------------------------------
# extraction

def extract(archive, target_dir):
    """Unpack a zip / tar / tar.gz / tar.xz / tar.bz2 archive into target_dir, atomically.

    Members are unpacked into a temporary folder next to target_dir, which replaces target_dir only
    when everything succeeded. Members that would land outside (absolute paths, `..`, links pointing
    outside, files written through a link), special files (devices, FIFOs), archives without a single
    file, and corrupt or truncated archives are refused: one ProbegenError naming the file.
    """
    archive, target_dir = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise ProbegenError(f"{archive}: no such archive")
    kind = archive_format(archive)
    if kind is None:
        raise ProbegenError(f"{archive}: not a zip or tar archive (tar, tar.gz, tar.xz, tar.bz2)")
    try:
        with atomic_dir(target_dir) as tmp:
            (_extract_tar if kind == "tar" else _extract_zip)(archive, tmp)
            if not any(p.is_file() for p in tmp.rglob("*")):
                raise ProbegenError(f"{archive}: the archive holds no files")
    except ARCHIVE_ERRORS as err:
        detail = " ".join(str(err).split())  # tarfile's reasons span several lines: keep one
        raise ProbegenError(f"{archive}: corrupt, truncated or not a {kind} archive "
                            f"({type(err).__name__}: {detail})") from None
    return target_dir


# Compressed streams (only tars are published compressed), then the tar and zip signatures.
COMPRESSED_TAR_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty zip


def archive_format(path):
    """"tar", "zip" or None, from the file's first bytes (never its name). Tar first: a plain tar whose
    last member is itself a zip (a .pth checkpoint) also passes zipfile.is_zipfile, which looks for a
    zip directory at the end of the file."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(COMPRESSED_TAR_MAGIC) or head[257:262] == b"ustar":
        return "tar"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if tarfile.is_tarfile(path):  # a pre-POSIX (v7) tar has no magic
        return "tar"
    return None


def _extract_zip(archive, tmp):
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:  # the central directory is cheap to read: check everything first
            _check_name(archive, info.filename)
        zf.extractall(tmp, members)  # zipfile writes symlink entries as plain files


def _extract_tar(archive, tmp):
    # one streaming pass (a second pass over a multi-GB .tar.xz would decompress it twice);
    # a refusal midway is harmless because tmp is discarded
    root = os.path.realpath(tmp)
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            _check_name(archive, member.name)
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise ProbegenError(f"{archive}: refusing member {member.name!r}: a device file or FIFO, "
                                    f"not a file, folder or link")
            # Lexically first, then on disk: a member may go through a link extracted before it.
            _check_inside(archive, member.name, root, os.path.join(root, member.name))
            if member.issym():
                link = posixpath.join(posixpath.dirname(member.name), member.linkname)
                _check_link(archive, member.name, link)
                _check_inside(archive, member.name, root, os.path.join(root, link), "links")
            elif member.islnk():
                _check_link(archive, member.name, member.linkname)  # hard links name a member
                _check_inside(archive, member.name, root, os.path.join(root, member.linkname), "links")
            try:
                tf.extract(member, tmp, **TAR_FILTER)
            except tarfile.FilterError as err:
                raise ProbegenError(f"{archive}: refusing member {member.name!r}: {err}") from None


def _check_inside(archive, name, root, path, verb="would land"):
    """path, with the links already on disk resolved, must stay under root (the extraction folder)."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + os.sep):
        raise ProbegenError(f"{archive}: refusing member {name!r}: it {verb} outside the target folder")


def _check_name(archive, name):
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts[0].endswith(":") and len(parts[0]) == 2):
        raise ProbegenError(f"{archive}: refusing member {name!r}: it would land outside the target folder")


def _check_link(archive, name, target):
    target = target.replace("\\", "/")
    normal = posixpath.normpath(target)
    if target.startswith("/") or normal == ".." or normal.startswith("../"):
        raise ProbegenError(f"{archive}: refusing member {name!r}: it links outside the target folder")


# -----------------------------------------------------------------------------
# a researcher's own zoo folder

def check_own_folder(src):
    """A zoo folder to copy: at least one file; links only to files and folders inside it, and no
    folder reached twice through links (a loop would make the copy endless, a repeat duplicates models);
    no devices or FIFOs (reading a FIFO blocks). Otherwise one ProbegenError naming the entry."""
    root = os.path.realpath(src)
    seen, files = {root}, 0
    for folder, dirs, names in os.walk(root, followlinks=True):
        for name in dirs + names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                _check_own_link(src, root, path)
            real = os.path.realpath(path)
            if name in dirs:
                if real in seen:
                    what = "a symlink loop" if (folder + os.sep).startswith(real + os.sep) else "a folder linked twice"
                    raise ProbegenError(f"{path}: {what} in the zoo folder {src}")
                seen.add(real)
            elif os.path.isfile(real):
                files += 1
            else:
                raise ProbegenError(f"{path}: not a regular file (a device, FIFO or socket) in the zoo folder")
    if files == 0:
        raise ProbegenError(f"{src}: the zoo folder holds no files")


def _check_own_link(src, root, path):
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as err:  # ELOOP (a link to itself, or a cycle of links), or a dangling link
        what = "a symlink loop" if err.errno == errno.ELOOP else "a broken symlink"
        raise ProbegenError(f"{path}: {what} in the zoo folder {src}") from None
    if real != root and not real.startswith(root + os.sep):
        raise ProbegenError(f"{path}: a symlink pointing outside the zoo folder {src} (to {real})")


# -----------------------------------------------------------------------------
# a zoo: download once, extract atomically

def fetch_zoo(url, raw_dir, *, sha256=None, archive_name=None, cache_dir="data/downloads", progress=True):
    """Download (or copy) a zoo's archive into cache_dir and unpack it into raw_dir.

    Returns {"path": raw_dir, "archive", "sha256", "size"}. A local folder is copied into raw_dir as is.
    """
    raw_dir = Path(raw_dir)
    src = local_path(url)
    if src is not None and src.is_dir():
        if sha256:
            raise ProbegenError(f"{src}: a sha256 is pinned but the source is a folder, not an archive")
        check_own_folder(src)
        with atomic_dir(raw_dir) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)  # follows the (checked) links: copies are plain files
        return {"path": str(raw_dir), "archive": None, "sha256": None, "size": None}
    if src is not None:  # your own archive: read where it is, every time (never a cached copy that could be stale)
        if not src.is_file():
            raise ProbegenError(f"{src}: no such file")
        observed = file_sha256(src)
        if sha256 is not None and observed != sha256.lower():
            raise ProbegenError(f"{src}: sha256 mismatch: expected {sha256}, got {observed}")
        extract(src, raw_dir)
        return {"path": str(raw_dir), "archive": str(src), "sha256": observed, "size": src.stat().st_size}
    name = archive_name or url_file_name(url)
    got = download(url, Path(cache_dir) / name, sha256=sha256, progress=progress)
    try:
        extract(got["path"], raw_dir)
    except ProbegenError as err:
        if sha256 is None:  # an unverified download is the likely culprit: fetch it afresh next time
            Path(got["path"]).unlink(missing_ok=True)
            sidecar_path(got["path"]).unlink(missing_ok=True)
            raise ProbegenError(f"{err}; removed the cached download, rerun to fetch it again") from None
        raise
    return {"path": str(raw_dir), "archive": got["path"], "sha256": got["sha256"], "size": got["size"]}
