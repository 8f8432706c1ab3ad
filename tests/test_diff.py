from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.diff import PlanCounts, SeenKeys, check_guardrails, classify
from connector.errors import GuardrailError
from connector.ledger.store import LedgerIndex


def test_classify_finds_unchanged_only_when_settled_and_same_fingerprint() -> None:
    keys = np.array([b"a" * 16, b"b" * 16, b"c" * 16], dtype="S16")
    index = LedgerIndex(
        keys=keys,
        fingerprints=np.array([1, 2, 3], dtype=np.uint64),
        stable=np.array([True, True, False]),
        on_platform=np.array([True, True, False]),
        payload_hashes=np.zeros(3, dtype=np.int64),
    )
    batch = np.array([b"b" * 16, b"a" * 16, b"c" * 16, b"d" * 16], dtype="S16")
    fps = np.array([2, 9, 3, 4], dtype=np.uint64)
    c = classify(index, batch, fps)
    assert c.found.tolist() == [True, True, True, False]
    assert c.unchanged.tolist() == [True, False, False, False]
    assert c.pos[:3].tolist() == [1, 0, 2]


# keys from a small alphabet of prefixes and suffixes: many keys share their first 8 bytes, and
# some end in NUL bytes (numpy strips those when it hands a key back)
_key = st.builds(lambda a, b: a + b, st.sampled_from([b"\0" * 8, b"prefix01", b"prefix02", b"\xff" * 8]),
                 st.sampled_from([b"\0" * 8, b"suffix01", b"suffix0\0", b"\x80" * 8]))  # fmt: skip


@given(st.lists(st.lists(_key, max_size=12), max_size=8), st.lists(_key, max_size=12))
def test_seen_keys_and_index_lookup_agree_with_a_set(batches: list[list[bytes]], ledger: list[bytes]) -> None:
    seen, expected = SeenKeys(), set()
    for batch in batches:
        dup = seen.add(np.array(batch, dtype="S16")) if batch else np.zeros(0, dtype=bool)
        want = []
        for k in batch:
            want.append(k in expected)
            expected.add(k)
        assert dup.tolist() == want
    assert len(seen) == len(expected)
    keys = np.array(sorted(set(ledger)), dtype="S16")
    n = len(keys)
    index = LedgerIndex.from_codes(keys, np.zeros(n, dtype=np.uint64), np.full(n, 2, np.uint8), np.zeros(n, np.int64))
    probe = [k for b in batches for k in b]
    pos, found = index.lookup(np.array(probe, dtype="S16"))
    assert found.tolist() == [k in set(ledger) for k in probe]
    assert all(keys[p].ljust(16, b"\0") == k for p, k, f in zip(pos.tolist(), probe, found.tolist(), strict=True) if f)


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
