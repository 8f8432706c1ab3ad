"""Guardrails: plans that look like accidents stop before anything is sent."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from connector.diff import PairInput, PlanCounts, Planner, SegmentSpec, check_guardrails
from connector.errors import GuardrailError
from connector.ledger.files import MEMBER, ON, SENT, PairFiles, member_schema
from connector.ledger.journal import Journal, PairPointer
from connector.ledger.recovery import CONFIRMED, PLANNED, current_sql, register_journal


def test_guardrails() -> None:
    ok = PlanCounts(source_rows=10, removes=2, audience_before=10)
    check_guardrails(ok, mode="mirror", max_remove_share=0.2, force=False, pair="p")
    too_many = PlanCounts(source_rows=10, removes=3, audience_before=10)
    with pytest.raises(GuardrailError, match="30%"):
        check_guardrails(too_many, mode="mirror", max_remove_share=0.2, force=False, pair="p")
    check_guardrails(too_many, mode="mirror", max_remove_share=0.2, force=True, pair="p")
    check_guardrails(too_many, mode="add_only", max_remove_share=0.2, force=False, pair="p")
    empty = PlanCounts(source_rows=0, removes=0, audience_before=4)
    with pytest.raises(GuardrailError, match="0 rows"):
        check_guardrails(empty, mode="mirror", max_remove_share=1.0, force=False, pair="p")


def test_pairs_are_compared_member_by_member_not_by_how_many_are_in_each_state(tmp_path: Path) -> None:
    """The pass joins the source with one pair's members and, for each other pair, only the members where it
    differs. Two pairs with as many members in each state, but not the same ones, differ in those members;
    a pair that holds the same members in the same states differs in none."""
    journal = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    con = duckdb.connect()
    # (key, state, run): run 7's batch 0 was never acknowledged, so its members are "maybe" (planned)
    holdings = {
        "a": [(1, SENT, 7), (2, ON, None), (3, ON, None), (4, ON, None)],
        "b": [(1, SENT, 7), (2, ON, None), (3, ON, None), (4, ON, None)],
        "c": [(1, ON, None), (2, SENT, 7), (3, ON, None), (4, ON, None)],
    }
    inputs = []
    for dest, members in holdings.items():
        files = PairFiles(tmp_path / "members", "seg", dest)
        files.write("base.parquet", pa.Table.from_pylist([
            {"k": k.to_bytes(16, "big"), "kind": MEMBER, "fp": k, "fq": k, "p_EMAIL": bytes([k]) * 32, "st": st,
             "run": run, "b": 0 if run else None}
            for k, st, run in members
        ], schema=member_schema(("EMAIL",))))  # fmt: skip
        pointer = journal.move_pair("seg", dest, PairPointer(), "base.parquet", None, 7)
        inputs.append(PairInput(
            name=dest, platform="meta", payload_keys=("EMAIL",), files=files, pointer=pointer,
            current=current_sql(files, pointer, member_schema(("EMAIL",))),
            journal=register_journal(con, journal, "seg", dest, dest), run_id=8, fingerprinted=True,
        ))  # fmt: skip
    spec = SegmentSpec(key="id", identifiers={"email": "email"}, default_region="US", mode="mirror",
                       consent_columns=(None, None), consent_defaults=("granted", "granted"))  # fmt: skip
    planner = Planner(con, spec, inputs, dry_run=True)
    planner._compare_pairs(by_fp=True)
    assert list(planner._differences) == [2]
    differ = con.sql(f"SELECT j_fp, cls FROM {planner._differences[2]} ORDER BY j_fp").fetchall()
    assert differ == [(1, CONFIRMED), (2, PLANNED)]  # pair c's states of the two members it holds otherwise
    journal.close()
