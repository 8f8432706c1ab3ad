"""The ledger: what each platform accepted, per (segment, destination, member).

`files` holds the members (an immutable Parquet base and one cumulative delta per pair), `journal`
the control plane (pairs, runs, acknowledged batches, rejections, audiences), `recovery` resolves a
pair's rows against the journal, and `migrate` converts a ledger of the row-per-member design.
"""

from connector.ledger.journal import ON_PLATFORM, AudienceRecord, Journal, RunRecord

__all__ = ["ON_PLATFORM", "AudienceRecord", "Journal", "RunRecord"]
