"""User-facing errors, and the process discipline of a stage script.

Every stage's main() goes through `@cli` (or `cli(fn, stage=name)`):
- a ProbegenError (bad input) becomes one line `error: <message>` on stderr and exit code 1, and so does
  a full disk (ENOSPC / EDQUOT) that no atomic writer turned into a ProbegenError first;
- when the stage runs as a script (main defined in `__main__`, or a `stage=` name given), it also
  * dies with the process that started it: PR_SET_PDEATHSIG (Linux) sends it SIGTERM when its parent
    exits, and when a shell sits between DVC and the stage (DVC runs `$SHELL -c cmd`; dash does not exec)
    a watchdog thread does the same when the DVC process is gone;
  * turns SIGTERM / SIGINT into an exception (Interrupted, a KeyboardInterrupt), so `finally:` blocks
    remove temporary files; it prints one line `interrupted (SIGTERM)` and exits 128 + the signal number;
  * holds an exclusive lock per stage target (the `stage=` name, else the script's name and arguments)
    for its whole run, so a rerun waits for an orphan that is still finishing, and after
    PROBEGEN_LOCK_WAIT seconds (default 60) refuses with one line naming its pid, instead of racing it.
Called in-process without a `stage=` name (tests, a notebook), a cli main only gets the error handling.
"""

import contextlib
import ctypes
import errno
import faulthandler
import fcntl
import functools
import hashlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOCK_WAIT_S = 60.0
WATCH_EVERY_S = 0.5

# Who started this process, seen as early as probegen is imported (stage scripts import it first): the
# parent-death signal is set later, and a parent that died in between must not go unnoticed.
_PID_AT_IMPORT, _PARENT_AT_IMPORT = os.getpid(), os.getppid()


class ProbegenError(Exception):
    """Bad input (params, archive, checkpoint, ...). The message is one line that names the culprit."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT (or a lost parent) while a stage runs: unwinds the stack so that temp files go."""

    def __init__(self, signum, why=None):
        super().__init__(signum)
        self.signum = int(signum)
        self.why = why or signal.Signals(signum).name

    def __str__(self):
        return f"interrupted ({self.why})"


def cli(main=None, *, stage=None):
    """Wrap a stage's main(): errors become one line on stderr and a non-zero exit (see the module doc).

    `@cli` on a script's main, or `cli(fn, stage="train.digits_inr.probegen")` to run fn under the stage
    discipline (signals, parent death, lock) with that lock name wherever fn is defined."""
    if main is None:
        return lambda fn: cli(fn, stage=stage)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        as_script = stage is not None or main.__module__ == "__main__"
        try:
            if not as_script:
                return main(*args, **kwargs)
            with stage_guard(lock_name(stage) if stage is not None else stage_key(main, args, kwargs)):
                return main(*args, **kwargs)
        except ProbegenError as err:
            _exit(f"error: {err}", 1)
        except OSError as err:
            if err.errno not in FULL_DISK_ERRNOS:
                raise
            _exit(f"error: {err.filename or 'a write'}: {os.strerror(err.errno)} ({errno.errorcode[err.errno]})", 1)
        except KeyboardInterrupt as err:
            if not as_script:
                raise
            signum = getattr(err, "signum", signal.SIGINT)
            _exit(str(err) if isinstance(err, Interrupted) else "interrupted (SIGINT)", 128 + signum)

    return wrapper


def _exit(line, code):
    print(line, file=sys.stderr)
    sys.exit(code)


# ------------------------------------------------------------------------------------ signals -> exceptions


class _Signals:
    depth = 0  # > 0 inside deferred_interrupts()
    pending = None  # a signal that arrived while deferred
    seen = None  # the first signal: later ones are ignored, so cleanup is not cut short


def _on_signal(signum, frame):
    if _Signals.seen is not None:
        return
    _Signals.seen = signum
    if _Signals.depth:
        _Signals.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold an Interrupted back until the block is done (a few renames that must happen together)."""
    _Signals.depth += 1
    try:
        yield
    finally:
        _Signals.depth -= 1
        if _Signals.depth == 0 and _Signals.pending is not None:
            signum, _Signals.pending = _Signals.pending, None
            raise Interrupted(signum)


@contextlib.contextmanager
def stage_guard(key):
    """Everything a stage runs under: signal handlers, parent-death signal, the stage lock. All of it is
    undone on the way out, so an in-process caller (`probegen.cli.main([...])`) keeps its own settings."""
    faulthandler.enable()  # a SIGSEGV / SIGBUS prints where it happened instead of dying without a word
    _Signals.seen = _Signals.pending = None
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with dying_with_parent(), stage_lock(key):
            yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------ dying with the parent


@contextlib.contextmanager
def dying_with_parent():
    """SIGTERM this process when its parent exits (Linux), and when DVC exits if a shell sits between."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0  # refused in some sandboxes
    done = threading.Event()
    try:
        # The classic race: a parent that exited before prctl() sends nothing. Compare with the parent seen
        # at import (a forked child of the importer has the importer as its parent).
        expected = _PARENT_AT_IMPORT if os.getpid() == _PID_AT_IMPORT else _PID_AT_IMPORT
        if os.getppid() != expected:
            raise Interrupted(signal.SIGTERM, "its parent process exited before the stage started")
        dvc = dvc_process()
        if dvc is not None and (dvc != os.getppid() or not armed):
            _watch(dvc, done)
        yield
    finally:
        done.set()
        if armed:
            libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)


def dvc_process():
    """pid of the DVC process running this stage, or None when not under DVC. DVC sets DVC_STAGE only in
    the stage command's environment, so it is the nearest ancestor whose environment lacks it."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    marker = f"DVC_STAGE={stage}".encode()
    pid = os.getppid()
    while pid > 1:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return pid  # not ours to read: not a process DVC started for this stage
        if marker not in environ:
            return pid
        pid = _proc_stat(pid)[1] or 0
    return None


def _proc_stat(pid):
    """(state, parent pid, start time) of a process from /proc, or (None, None, None) if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None, None, None
    return fields[0], int(fields[1]), int(fields[19])


def _watch(pid, done):
    """A daemon thread that sends this process SIGTERM once `pid` has exited (pid reuse: start time),
    until `done` is set."""
    born = _proc_stat(pid)[2]
    if born is None:
        raise Interrupted(signal.SIGTERM, "DVC exited before the stage started")

    def watch():
        while not done.wait(WATCH_EVERY_S):
            state, _, start = _proc_stat(pid)
            if start != born or state in ("Z", "X"):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="probegen-watch-dvc", daemon=True).start()


# ------------------------------------------------------------------------------------------- stage lock


def stage_key(main, args, kwargs):
    """Lock name of one stage target: the script's name and its arguments ("train.digits_inr.probegen.0"),
    the same whether DVC or a person starts it."""
    script = getattr(sys.modules.get(main.__module__), "__file__", None) or main.__name__
    parts = [Path(script).stem, *map(str, args), *(f"{k}={v}" for k, v in sorted(kwargs.items()))]
    return lock_name(".".join(parts))


def lock_name(text):
    """A file name for a lock: unusual characters replaced, a long name shortened with its hash."""
    key = re.sub(r"[^A-Za-z0-9_.=@+-]", "_", str(text))
    if len(key) > 120:
        key = f"{key[:100]}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return key


def lock_folder():
    """DVC's own scratch folder when there is one (ignored by git and DVC), else .probegen/locks/."""
    root = Path(os.environ.get("DVC_ROOT") or ".")
    return root / ".dvc" / "tmp" / "probegen-locks" if (root / ".dvc").is_dir() else root / ".probegen" / "locks"


@contextlib.contextmanager
def stage_lock(key):
    """Exclusive lock for the block; released by the kernel however the process ends (even SIGKILL)."""
    path = lock_folder() / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    wait = float(os.environ.get("PROBEGEN_LOCK_WAIT", LOCK_WAIT_S))
    with open(path, "a+") as f:
        if not _try_lock(f):
            holder = _holder(path)
            print(f"{os.environ.get('DVC_STAGE') or key}: waiting up to {wait:g} s for the run still going "
                  f"(pid {holder}) to finish", file=sys.stderr)
            deadline = time.monotonic() + wait
            while not _try_lock(f):
                if time.monotonic() >= deadline:
                    raise ProbegenError(f"{path}: another run of this stage (pid {holder}) is still running "
                                        f"after {wait:g} s; wait for it or stop it (kill {holder}), then rerun")
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _try_lock(f):
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path):
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
