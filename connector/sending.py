"""Sending one pair's member file to its platform.

The batches are read straight from the file's columns (no Python object per member), in the file's
order: removals first, then additions, batch numbers ascending. Each acknowledged call is one journal
row at once, so a crash re-sends at most the batch in flight. A full refresh sends the file's members
as one replace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connector.destinations.base import AudienceRef, BatchSession, Destination, MemberBatch
from connector.diff import PairPlan
from connector.errors import LedgerError
from connector.ledger.files import MEMBER, OWED, SENT, as_read, payload_column
from connector.ledger.journal import BatchAck, Journal
from connector.progress import Phase, Progress, ProgressEvent


@dataclass(slots=True)
class Sender:
    """Sends the file a pair's plan wrote. `check_stop` raises when sending must stop (between batches)."""

    journal: Journal
    segment: str
    destination: str
    dest: Destination
    audience: AudienceRef
    plan: PairPlan
    payload_keys: Sequence[str]
    values: bool  # the pair sends members' values
    check_stop: Callable[[], None]
    progress: Progress | None = None
    deferred: int = 0  # removals the platform put off (sent again by a later run)

    def batches(self, path: Path, members_only: bool = False) -> Iterator[tuple[int, int, MemberBatch]]:
        """(b, kind, members) of each batch this run sends, read from its file in the file's order (batch
        numbers ascending: the file was written so)."""
        run_id = self.plan.input.run_id
        keys = [payload_column(k) for k in self.payload_keys]
        pending: list[pa.RecordBatch] = []
        cur = last = -1

        def flush() -> tuple[int, int, MemberBatch]:
            # one slice (the usual case) is used as it is; several are put together once
            t = pending[0] if len(pending) == 1 else pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            payload = {k: t.column(payload_column(k)) for k in self.payload_keys}
            consent = t.column("c")
            values = t.column("v") if self.values else None
            batch = MemberBatch(t.column("k"), payload, consent if consent.null_count < len(consent) else None, values)
            return cur, int(t.column("kind")[0].as_py()), batch

        # pre_buffer=False: pyarrow's pre-buffering keeps every row group read so far until the reader ends
        # (1.2 GB for a 10M-member file); without it one row group at a time is held. Read several batches'
        # rows at a time: fewer, larger steps
        reader = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=max(self.plan.input.batch_size, 100_000),
                                                   columns=["k", "kind", "st", "run", "b", *keys, "c", "v"])  # fmt: skip
        for rb in map(as_read, reader):
            sending = pc.and_(pc.equal(rb.column("run"), run_id), pc.equal(rb.column("st"), SENT))
            if members_only:
                sending = pc.and_(sending, pc.equal(rb.column("kind"), MEMBER))
            sending = pc.fill_null(sending, False)
            if not pc.all(sending).as_py():  # a first run sends every row: nothing to filter out
                rb = rb.filter(sending)
            if not rb.num_rows:
                continue
            b = rb.column("b").to_numpy(zero_copy_only=False)
            starts = [0, *(np.flatnonzero(np.diff(b)) + 1).tolist(), len(b)]
            for s, e in pairwise(starts):
                value = int(b[s])
                if value != cur:
                    if value < last:
                        raise LedgerError("a member file is out of batch order; run again with --full-refresh")
                    if pending:
                        yield flush()
                    pending, cur, last = [], value, value
                pending.append(rb.slice(s, e - s))
        if pending:
            yield flush()

    def push(self, path: Path) -> int:
        """Send the file's removals, then its additions; returns the write calls made."""
        plan, run_id = self.plan, self.plan.input.run_id
        sid = int(time.time() * 1000) % (1 << 62)
        calls = sent = 0
        seq = {OWED: 0, MEMBER: 0}
        totals = {OWED: plan.remove_batches, MEMBER: plan.add_batches}
        estimated = {OWED: plan.counts.removes + plan.counts.changes, MEMBER: plan.sends}
        for b, kind, batch in self.batches(path):
            self.check_stop()
            seq[kind] += 1
            n = max(totals[kind], seq[kind])
            session = BatchSession(session_id=sid + kind, seq=seq[kind], last=seq[kind] >= n, estimated_total=estimated[kind])
            if kind == OWED:
                out = self.dest.remove_members(self.audience, batch, session)
                self.deferred += len(out.deferred)
                ack = BatchAck(run_id, b, "remove", len(batch), out.request_id, deferred=dict(out.deferred))
            else:
                out = self.dest.add_members(self.audience, batch, session)
                ack = BatchAck(run_id, b, "add", len(batch), out.request_id, "pending" if out.pending else "ok",
                               rejected=dict(out.rejected))  # fmt: skip
            calls, sent = calls + 1, sent + len(batch)
            self.journal.ack_batch(self.segment, self.destination, ack)
            self._report("sending", sent)
        if calls:
            self.dest.finish(self.audience)
            self._report("done", sent)
        return calls

    def replace(self, path: Path) -> int:
        """Send the file's members as the audience's whole new content; returns the write calls made."""
        plan = self.plan
        sent = 0

        def batches() -> Iterator[MemberBatch]:
            nonlocal sent
            for _, _, batch in self.batches(path, members_only=True):
                self.check_stop()
                sent += 1
                yield batch

        out = self.dest.replace_members(self.audience, batches(), plan.sends)
        self.journal.ack_batch(self.segment, self.destination,
                               BatchAck(plan.input.run_id, 0, "replace", plan.sends, out.request_id,
                                        "pending" if out.pending else "ok", rejected=dict(out.rejected)))  # fmt: skip
        return max(1, sent)

    def _report(self, what: Phase, sent: int) -> None:
        if self.progress:
            self.progress(ProgressEvent(self.segment, self.destination, what, sent, self.plan.sends))
