"""The chaos convergence suite, CI subset: a few seeds of tests/chaos/scenario.py. Each scenario runs
real `connector sync` processes, SIGKILLs some of them at chosen write requests, injects platform
faults, and checks that every emulator audience equals what the reference normalizer says the
platform holds, and that the ledger agrees. `python benchmarks/chaos.py --seeds 200` runs the full suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from scenario import OUTCOMES, run_scenario

SEEDS = [int(s) for s in os.environ.get("CONNECTOR_CHAOS_SEEDS", "1,2,4").split(",") if s.strip()]
PG = os.environ.get("CONNECTOR_TEST_POSTGRES_URL")


@pytest.mark.parametrize("seed", SEEDS)
def test_audiences_converge_after_faults_and_kills(seed: int, tmp_path: Path) -> None:
    out = run_scenario(seed, tmp_path)
    OUTCOMES.append(out)
    assert out.kills > 0 and out.faults_injected > 0, (out.kills, out.faults)  # a scenario that tested something
    assert out.mismatches == [], "\n".join([*out.mismatches, *out.log])


@pytest.mark.skipif(not PG, reason="CONNECTOR_TEST_POSTGRES_URL not set: chaos on a PostgreSQL ledger skipped")
@pytest.mark.parametrize("seed", [101])
def test_audiences_converge_with_a_postgresql_ledger(seed: int, tmp_path: Path) -> None:
    out = run_scenario(seed, tmp_path, ledger_url=PG)
    OUTCOMES.append(out)
    assert out.kills > 0 and out.faults_injected > 0, (out.kills, out.faults)
    assert out.mismatches == [], "\n".join([*out.mismatches, *out.log])
