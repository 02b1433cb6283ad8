"""Where the broker keeps its truth: :class:`Store` and its SQLite and in-memory kinds."""

from corral.store.base import (
    JobQuery,
    JobRecord,
    ScheduleRecord,
    Snapshot,
    Store,
    StoreError,
    WorkerRecord,
    open_store,
)

__all__ = [
    "JobQuery",
    "JobRecord",
    "ScheduleRecord",
    "Snapshot",
    "Store",
    "StoreError",
    "WorkerRecord",
    "open_store",
]
