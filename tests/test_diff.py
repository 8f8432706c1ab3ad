"""Guardrails: plans that look like accidents stop before anything is sent."""

from __future__ import annotations

import pytest

from connector.diff import PlanCounts, check_guardrails
from connector.errors import GuardrailError


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
