"""Transparent huge pages are off in a process that syncs (`connector.hugepages`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_THP_DISABLE) is Linux's")
def test_an_engine_turns_transparent_huge_pages_off_for_its_process(tmp_path: Path) -> None:
    (tmp_path / "connector.toml").write_text(textwrap.dedent("""
        state_dir = "state"
        [destinations.meta]
        type = "meta"
        ad_account_id = "1"
        sandbox = true
        [segments.s]
        source = { type = "csv", path = "m.csv" }
        identifiers = { email = "email" }
        destinations = ["meta"]
    """))
    code = textwrap.dedent(f"""
        from connector import hugepages
        from connector.engine import Engine
        from connector.settings import load_settings
        assert not hugepages.disabled(), "a fresh process has them as the system sets them"
        with Engine(load_settings({str(tmp_path / "connector.toml")!r})):
            pass
        assert hugepages.disabled()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
