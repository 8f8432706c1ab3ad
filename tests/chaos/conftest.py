"""Print the chaos summary line (scenarios, faults injected, kills, mismatches) at the end of a test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from scenario import OUTCOMES, summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if OUTCOMES:
        terminalreporter.write_line(summary(OUTCOMES))
