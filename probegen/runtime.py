"""Process-wide memory policy for training processes (stages, the benchmark, the test session).

Every training step allocates and frees the same large activation buffers (a CNN probing step: 59 MB for
the first conv's output alone). glibc hands every block above its mmap threshold back to the kernel on
free, so the next step page-faults and zero-fills it again: measured on the 2-core CPU, the CNN probing
step took 3x longer that way (495 vs 158 ms; `python -m probegen.bench` prints the step). With mmap off
for malloc, large blocks come from the heap and stay there for reuse (up to 1 GiB of free heap at its
top): after a few steps the heap has grown to the loop's needs and no step faults any more. The cost is
memory: a process keeps its peak heap (the digits_cnn probegen stage: 1.15 GB instead of 0.85 GB). Results
are unchanged (the same kernels on the same numbers).

Elsewhere than glibc (macOS, musl) this does nothing. Setting MALLOC_MMAP_MAX_ yourself before the process
starts takes precedence: keep_freed_memory() then leaves malloc as it is.
"""

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30}
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}


def keep_freed_memory(keep=True):
    """keep=True: freed large blocks stay in the heap for reuse instead of going back to the kernel;
    keep=False: glibc's defaults again (what the benchmark compares against).

    Returns True when malloc was reconfigured, False where it could not be (not glibc) or is left to the
    MALLOC_MMAP_MAX_ environment variable."""
    if "MALLOC_MMAP_MAX_" in os.environ:
        return False
    return all(_mallopt(option, value) for option, value in (KEPT if keep else GLIBC_DEFAULTS).items())


def _mallopt(option, value):
    libc = _libc()
    return libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(option, value))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # no C library by that name
        return None
