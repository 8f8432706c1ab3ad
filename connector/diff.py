"""Pure planning: classify source rows against the ledger and decide what a run may do.

Nothing here does I/O. The engine feeds it arrays (16-byte member keys, 64-bit raw-row
fingerprints) per source batch, and asks at the end whether the plan passes the guardrails.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from connector.errors import GuardrailError
from connector.ledger.store import LedgerIndex, find_keys, key_prefixes


@dataclass(slots=True)
class PlanCounts:
    """What one (segment, destination) plan holds; also the run's reported counts."""

    source_rows: int = 0
    invalid: int = 0  # rows that yield no member for this platform (no usable identifier...)
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    adds: int = 0  # members new to the platform
    changes: int = 0  # members whose identifiers changed: remove old payload + add new
    removes: int = 0  # members who left the segment
    consent_denied: int = 0
    resends: int = 0  # re-sent before the platform's membership expires, or after a failure
    audience_before: int = 0  # members on the platform before this run

    def as_dict(self) -> dict[str, object]:
        return {
            "source_rows": self.source_rows,
            "invalid": self.invalid,
            "invalid_reasons": dict(sorted(self.invalid_reasons.items())),
            "unchanged": self.unchanged,
            "adds": self.adds + self.changes,
            "new_members": self.adds,
            "identifier_changes": self.changes,
            "removes": self.removes + self.changes,
            "left_segment": self.removes,
            "consent_denied": self.consent_denied,
            "resends": self.resends,
            "audience_before": self.audience_before,
        }


@dataclass(slots=True)
class Classified:
    """Per row of a batch: where it is in the ledger index and whether it needs no work."""

    pos: npt.NDArray[np.intp]
    found: npt.NDArray[np.bool_]
    unchanged: npt.NDArray[np.bool_]


def classify(
    index: LedgerIndex, keys: npt.NDArray[np.bytes_], fps: npt.NDArray[np.uint64],
    looked_up: tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]] | None = None,
) -> Classified:  # fmt: skip
    """A row is unchanged when the ledger has its key, with the same raw fingerprint, in a
    settled state (accepted/confirmed/rejected): it is neither normalized nor hashed again.
    `looked_up` is `index.lookup(keys)` when the caller already has it."""
    pos, found = looked_up if looked_up is not None else index.lookup(keys)
    if len(index) == 0:
        return Classified(pos, found, found.copy())
    same = found & (index.fingerprints[pos] == fps) & index.stable[pos]
    return Classified(pos, found, same)


class SeenKeys:
    """Keys read so far in a run that no ledger knew, to spot duplicate rows in the source:
    sorted runs of (prefix, key), merged as they grow. 24 bytes a key (a set of bytes: ~100)."""

    def __init__(self) -> None:
        self._runs: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.bytes_]]] = []

    def __len__(self) -> int:
        return sum(len(p) for p, _ in self._runs)

    def add(self, keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.bool_]:
        """Adds `keys`; returns which were seen before (in an earlier batch, or earlier in this one:
        the first occurrence is the one kept)."""
        pre = key_prefixes(keys)
        dup = np.zeros(len(keys), dtype=bool)
        for run_p, run_k in self._runs:
            dup |= find_keys(run_p, run_k, keys, pre)[1]
        _, first = np.unique(keys, return_index=True)
        again = np.ones(len(keys), dtype=bool)
        again[first] = False
        dup |= again
        fresh = ~dup
        order = np.argsort(pre[fresh], kind="stable")
        if order.size:
            self._runs.append((pre[fresh][order], keys[fresh][order]))
        # runs stay few (about log2 of the batches): each lookup touches every run
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (bp, bk), (ap, ak) = self._runs.pop(), self._runs.pop()
            p, k = np.concatenate([ap, bp]), np.concatenate([ak, bk])
            order = np.argsort(p, kind="stable")
            self._runs.append((p[order], k[order]))
        return dup


def check_guardrails(
    counts: PlanCounts, *, mode: str, max_remove_share: float, force: bool, pair: str
) -> None:
    """Stop a plan that looks like an accident before anything is sent."""
    if force or mode == "add_only":
        return
    if counts.source_rows == 0 and counts.audience_before > 0:
        raise GuardrailError(
            f"{pair}: the source returned 0 rows but the audience has {counts.audience_before} "
            "members; refusing to empty it (check the source, or pass --force)"
        )
    if counts.audience_before == 0:
        return
    share = counts.removes / counts.audience_before
    if share > max_remove_share:
        raise GuardrailError(
            f"{pair}: the plan removes {counts.removes} of {counts.audience_before} members "
            f"({share:.0%}), more than max_remove_share = {max_remove_share:.0%}; "
            "check the source, raise max_remove_share, or pass --force"
        )
