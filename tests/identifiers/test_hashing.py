"""Whole-column SHA-256 (`sha256_columns`, DataFusion) against `hashlib`, value by value."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.identifiers.hashing import sha256_columns


def _want(values: list[str | None], prefix: str, size: int = 32) -> list[bytes | None]:
    return [None if v is None else hashlib.sha256((prefix + v).encode()).digest()[:size] for v in values]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(st.characters(blacklist_categories=["Cs"]), max_size=80)), max_size=60),
       st.sampled_from(["", "1", "+1", "connector:key:"]))  # fmt: skip
def test_digests_are_hashlibs_row_by_row(values: list[str | None], prefix: str) -> None:
    arr = pa.array(values, pa.string())
    got = sha256_columns({"a": (arr, prefix), "b": (arr, "")})
    assert got["a"].type == pa.binary()
    assert got["a"].to_pylist() == _want(values, prefix)
    assert got["b"].to_pylist() == _want(values, "")
    assert sha256_columns({"k": (arr, prefix)}, size=16)["k"].to_pylist() == _want(values, prefix, 16)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_a_large_column_keeps_its_order(threads: int | None) -> None:
    """Rows come back in their order however the hashing is split (a batch of the engine's size)."""
    values = [None if i % 7 == 0 else f"user{i}@example.com" for i in range(150_000)]
    arr = pa.chunked_array([values[:70_000], values[70_000:]], pa.string())
    got = sha256_columns({"e": (arr.combine_chunks(), "")}, threads=threads)["e"]
    assert len(got) == len(values)
    assert got.to_pylist() == _want(values, "")


def test_no_columns_and_all_null() -> None:
    assert sha256_columns({}) == {}
    assert sha256_columns({"a": (pa.nulls(3, pa.string()), "1")})["a"].to_pylist() == [None] * 3
