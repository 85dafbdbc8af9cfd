"""The entry point's huge-page malloc: when it applies, that the re-executed process has
it, and that it removes the page faults of large allocations."""

import os
import subprocess
import sys

import pytest

from hybridlm import hugepages

TOUCH_256_MB = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # as XLA's CPU runtime allocates a step's scratch: malloc, touch, free
    p = libc.malloc(2**28)  # 256 MB: glibc serves it with a fresh mmap
    ctypes.memset(p, 1, 2**28)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, text=True,
                          capture_output=True, check=True).stdout.strip()


def test_opt_out_and_already_set_do_not_reexec():
    assert not hugepages.applies({"HYBRIDLM_HUGE_PAGES": "0"})
    assert not hugepages.applies({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_reexec_sets_the_tunable_and_keeps_others():
    code = ("from hybridlm import hugepages; hugepages.reexec(['-c', "
            "'import os; print(os.environ.get(\"GLIBC_TUNABLES\"))']); print('not re-executed')")
    out = run(code, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    if hugepages.applies({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}):
        assert out == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    else:
        assert out == "not re-executed"
    assert run(code, HYBRIDLM_HUGE_PAGES="0") == "not re-executed"


def test_huge_pages_remove_the_page_faults_of_large_allocations():
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if not hugepages.applies(environ):
        pytest.skip("glibc < 2.35, not Linux, or transparent huge pages off on this machine")
    plain = int(run(TOUCH_256_MB))
    huge = int(run(TOUCH_256_MB, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"))
    assert plain > 4 * 2**28 // 4096 // 2  # about every 4 KB page of the 1 GB touched faulted
    assert huge < plain / 8
