"""Atomic writers: every output appears complete or not at all (temp name in the same folder + rename).

- Temp names are `.<name>.<pid>.<random>.tmp` next to the target. The pid tells a live temp from one left
  by a process that is gone (SIGKILL, a crash, a power cut): a writer removes the stale temps of its target
  before writing it again (remove_stale_temps). DVC must not hash them: `.dvcignore` holds `.*.tmp`.
- A failed write (full disk, quota, permissions) is one ProbegenError naming the final path and the
  reason; the temp is removed and the previous output is left as it was.
- Outputs get the user's umask (mkstemp / mkdtemp create 0600 / 0700), as files written by other tools do.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from probegen.errors import FULL_DISK_ERRNOS, ProbegenError, deferred_interrupts

# A failed write that carries no errno (torch.save's RuntimeError, numpy's OSError "n requested and m
# written") on a filesystem with less than this free is reported as what it almost surely is: a full disk.
FULL_BELOW_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = _new_temp(path, folder=False)
    try:
        try:
            yield tmp
            os.chmod(tmp, _umasked(0o777 if tmp.is_dir() else 0o666))
            os.replace(tmp, path)
        except Exception as err:
            failure = write_error(path, tmp, err)
            if failure is None:
                raise
            raise failure from err
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _new_temp(path, folder=True)
    try:
        try:
            yield tmp
            os.chmod(tmp, _umasked(0o777))
            _swap_in(tmp, path)
        except Exception as err:
            failure = write_error(path, tmp, err)
            if failure is None:
                raise
            raise failure from err
    finally:
        _remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def write_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ------------------------------------------------------------------------------------------- temp names


def temp_pattern(path):
    """Regex of the temp names of `path` (group 1: the pid of the process that made it)."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.(\d+)\.[a-z0-9_]+\.tmp")


def remove_stale_temps(path):
    """Remove the temps of `path` whose process is gone; return their paths. Only names of the form
    `.<path name>.<pid>.<random>.tmp` in path's folder are looked at; live processes' temps stay."""
    path = Path(path)
    pattern, removed = temp_pattern(path), []
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):  # one we may not remove must not stop the write
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


def process_alive(pid):
    """True while `pid` runs (a zombie has exited: not alive). A pid reused since errs on the safe side."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill's answer
    return state not in ("Z", "X")


def _new_temp(path, folder):
    prefix = f".{path.name}.{os.getpid()}."
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        if folder:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as err:
        raise write_error(path, None, err) from err


def _swap_in(tmp, path):
    """Put the finished folder tmp at path. The previous folder is renamed aside first and removed after,
    so at every moment path holds the old or the new folder whole (never a half-deleted one); a signal
    waits until both renames are done. A leftover aside folder is a stale temp of path."""
    with deferred_interrupts():
        aside = None
        if path.is_dir() and not path.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
            os.rename(path, aside)  # onto the empty aside folder
        elif path.is_symlink() or path.exists():
            path.unlink()
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside is not None:
                os.rename(aside, path)
            raise
    if aside is not None:
        _remove(aside)


def _remove(p):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ write errors


def write_error(path, tmp, err):
    """The ProbegenError for an exception raised while writing `path` through `tmp`, or None when it is
    not a write failure (bad input found midway, an archive's own OSError): those propagate unchanged."""
    if isinstance(err, ProbegenError):
        return None
    code = getattr(err, "errno", None)
    if (code not in FULL_DISK_ERRNOS and isinstance(err, (OSError, RuntimeError)) and tmp is not None
            and filesystem_full(tmp.parent)):
        code = errno.ENOSPC
    if code in FULL_DISK_ERRNOS:
        return ProbegenError(f"{path}: cannot write it: {os.strerror(code)} ({errno.errorcode[code]}); "
                             f"the previous version, if any, is unchanged")
    if not isinstance(err, OSError):
        return None
    where = path if tmp is None else _inside(err.filename, tmp, path) or _inside(err.filename2, tmp, path)
    if where is None:
        return None
    reason = f"{err.strerror} ({errno.errorcode.get(code, code)})" if err.strerror else str(err)
    return ProbegenError(f"{where}: cannot write it: {reason}")


def _inside(name, tmp, path):
    """The final path corresponding to `name` if it lies in the temp `tmp`, else None."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    rel = os.path.relpath(os.path.abspath(name), os.path.abspath(tmp))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return path if rel == os.curdir else path / rel


def filesystem_full(folder):
    """Under FULL_BELOW_BYTES free for this user (root may use the reserved blocks), or no inode left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    root = os.geteuid() == 0
    free = (st.f_bfree if root else st.f_bavail) * st.f_frsize
    return free < FULL_BELOW_BYTES or (st.f_files > 0 and (st.f_ffree if root else st.f_favail) == 0)


def _umasked(mode):
    return mode & ~current_umask()


def current_umask():
    """The process umask, read without changing it (Linux: /proc; elsewhere set and restore at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
