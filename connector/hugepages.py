"""Transparent huge pages off for the process that syncs.

The Arrow and DataFusion libraries allocate through mimalloc, which asks the kernel for transparent huge
pages on its arenas and hands freed memory back to the kernel soon after. The kernel then zeroes a whole
2 MB page the first time anything in it is touched, again after each hand-back: a sync touches its
batches' memory sparsely and often, so most of that zeroing is for nothing. Measured on a 2-core virtual
machine (`benchmarks/pipeline.py`, a cold sync of 1M members): a quarter of all CPU time went to the
kernel zeroing huge pages (`clear_page_erms` under `do_huge_pmd_anonymous_page`), and the sync took 4.1 to
4.8 s with huge pages against 2.1 to 2.6 s without, in the same minutes. With them off the kernel backs
memory with 4 KB pages, zeroed as they are touched.

Linux only (`prctl(PR_SET_THP_DISABLE)`, which holds for the whole process and what it starts, from the
next page fault on); elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def disable() -> bool:
    """Turn transparent huge pages off for this process; whether they are off now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return _prctl(PR_SET_THP_DISABLE, 1) == 0
    except (OSError, AttributeError):  # no libc to load, or one without prctl
        return False


def disabled() -> bool:
    """Whether transparent huge pages are off for this process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return _prctl(PR_GET_THP_DISABLE) == 1
    except (OSError, AttributeError):
        return False
