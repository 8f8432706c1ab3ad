"""Member ledger: per (segment, destination, member) record of what the platform accepted."""

from connector.ledger.store import (
    ON_PLATFORM,
    TO_ADD,
    AudienceRecord,
    LedgerIndex,
    PendingMember,
    RunRecord,
    SqlLedger,
    StagedMember,
    open_ledger,
)

__all__ = [
    "ON_PLATFORM",
    "TO_ADD",
    "AudienceRecord",
    "LedgerIndex",
    "PendingMember",
    "RunRecord",
    "SqlLedger",
    "StagedMember",
    "open_ledger",
]
