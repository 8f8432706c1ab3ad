"""Arrow's allocator takes no transparent huge pages in a process that imported connector (`connector/__init__`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# THP_enabled of a process that starts with huge pages allowed (the flag is inherited: this test's own process
# imported connector), imports what it is given, then writes to a 64 MB Arrow buffer
PROBE = textwrap.dedent("""
    import ctypes
    assert ctypes.CDLL(None).prctl(41, 0, 0, 0, 0) == 0  # PR_SET_THP_DISABLE, 0
    {imports}
    import numpy as np
    import pyarrow as pa
    buf = pa.allocate_buffer(64 << 20)
    np.frombuffer(buf, dtype=np.uint8)[:] = 1
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("THP_enabled")))
""")


def thp_enabled(imports: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ALLOW_THP"} | {"PYTHONPATH": str(ROOT), **env}
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                         env=environ, timeout=120, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "THP_enabled" not in Path("/proc/self/status").read_text(),
    reason="a kernel that shows THP_enabled (Linux 6.x)",
)
def test_transparent_huge_pages_are_off_once_connector_is_imported() -> None:
    assert thp_enabled("import connector") == "0"
    # the probe tells the two apart: pyarrow alone, or with them allowed explicitly, keeps them
    assert thp_enabled("pass") == "1"
    assert thp_enabled("import connector", MIMALLOC_ALLOW_THP="1") == "1"
