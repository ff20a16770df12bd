"""probegen.runtime: with the memory policy on, a training-like loop of large allocations stops page-faulting
once the heap has grown (the freed blocks are reused); with glibc's defaults every round faults again."""

import os
import platform
import resource
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A fresh process (a clean heap): the policy or not, then rounds of a 64 MB and a 21 MB tensor, as a
# training step allocates and frees its activations; prints the page faults of the median of the last 5
# rounds (one round of kernel housekeeping, e.g. under a busy machine, may fault on its own).
LOOP = """
import resource, sys
from probegen.runtime import keep_freed_memory
assert keep_freed_memory(sys.argv[1] == "keep")
import torch
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(16 << 20), torch.ones(16 << 20 // 3)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del a, b
print(sorted(faults[-5:])[2])
"""


def last_rounds_faults(policy):
    out = subprocess.run([sys.executable, "-c", LOOP, policy], capture_output=True, text=True, check=True)
    return int(out.stdout)


@glibc_only
def test_kept_memory_is_reused_and_glibcs_default_faults_every_round():
    pages_per_round = (16 << 20) * 4 * 4 // 3 // resource.getpagesize()  # 85 MB
    assert last_rounds_faults("default") > pages_per_round // 2  # a typical round faults on its pages again
    assert last_rounds_faults("keep") < pages_per_round // 20  # ... and, kept, on under 5% of them


@glibc_only
def test_the_environment_variable_takes_precedence():
    code = "from probegen.runtime import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "MALLOC_MMAP_MAX_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
