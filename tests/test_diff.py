from __future__ import annotations

import numpy as np
import pytest

from connector.diff import PlanCounts, check_guardrails, classify
from connector.errors import GuardrailError
from connector.ledger.store import LedgerIndex


def test_classify_finds_unchanged_only_when_settled_and_same_fingerprint() -> None:
    keys = np.array([b"a" * 16, b"b" * 16, b"c" * 16], dtype="S16")
    index = LedgerIndex(
        keys=keys,
        fingerprints=np.array([1, 2, 3], dtype=np.uint64),
        stable=np.array([True, True, False]),
        on_platform=np.array([True, True, False]),
    )
    batch = np.array([b"b" * 16, b"a" * 16, b"c" * 16, b"d" * 16], dtype="S16")
    fps = np.array([2, 9, 3, 4], dtype=np.uint64)
    c = classify(index, batch, fps)
    assert c.found.tolist() == [True, True, True, False]
    assert c.unchanged.tolist() == [True, False, False, False]
    assert c.pos[:3].tolist() == [1, 0, 2]


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
