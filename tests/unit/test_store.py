"""Both stores behave alike; the SQLite one survives reopening and explains bad files."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from corral.store import (
    JobQuery,
    JobRecord,
    ScheduleRecord,
    StoreError,
    WorkerRecord,
    open_store,
)
from corral.store.sqlite import SQLiteStore


def rec(id_, state="queued", queue="default", submitted=1.0, **kw):
    return JobRecord(
        id=id_,
        queue=queue,
        state=state,
        headers="",
        body=b"[]",
        submitter=b"\xff",
        submitted=submitted,
        **kw,
    )


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/s/b.db"
    s = open_store(url)
    s.open()
    yield s
    s.close()


def test_upsert_and_snapshot(store):
    store.commit(
        [rec("a"), rec("b", "running", worker_uuid="w")],
        [WorkerRecord(uuid="w", id=3, queues="[]", registered=1, last_seen=1)],
        {"next_worker_id": 4},
    )
    store.commit([rec("a", "succeeded", result=b'{"value": 1}', completed=5.0)], [], {})
    assert store.get_job("a").state == "succeeded"
    assert store.get_job("a").submitter == b"\xff"
    assert store.get_job("zzz") is None


def test_query_filters(store):
    store.commit(
        [
            rec("a", submitted=1, label="x"),
            rec("b", "dead", submitted=2),
            rec("c", "dead", queue="q", submitted=3, worker_id=2),
        ],
        [],
        {},
    )
    ids = lambda q: [j.id for j in store.query_jobs(q)]  # noqa: E731
    assert ids(JobQuery(states=["dead"])) == ["c", "b"]
    assert ids(JobQuery(queue="q")) == ["c"]
    assert ids(JobQuery(label="x")) == ["a"]
    assert ids(JobQuery(worker_id=2)) == ["c"]
    assert ids(JobQuery(since=2, until=3)) == ["b"]
    assert ids(JobQuery(limit=1)) == ["c"]


def test_purge_only_finished(store):
    store.commit(
        [
            rec("old", "succeeded", completed=10),
            rec("new", "succeeded", completed=100),
            rec("q", "queued", submitted=1),
        ],
        [],
        {},
    )
    assert store.purge(50) == 1
    assert store.get_job("old") is None and store.get_job("q") is not None


def test_snapshot_lists_recent_finished_ids_oldest_first(store):
    store.commit([rec(f"j{i}", "succeeded" if i % 2 else "queued") for i in range(10)], [], {})
    store.commit([rec("j0", "dead")], [], {})  # an update keeps its place
    snap = store.open(recent=3)
    assert snap.finished_ids == ["j5", "j7", "j9"]
    assert sorted(store.open().finished_ids) == ["j0", "j1", "j3", "j5", "j7", "j9"]
    assert store.open().finished_ids[0] == "j0"


def test_sqlite_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    s = open_store(url)
    s.open()
    s.commit(
        [rec("a"), rec("done", "succeeded")],
        [WorkerRecord(uuid="w", id=5, queues="[]", registered=1, last_seen=1)],
        {"next_worker_id": 6},
    )
    s.close()
    s2 = open_store(url)
    snap = s2.open()
    assert [j.id for j in snap.jobs] == ["a"]  # unfinished only
    assert snap.next_worker_id == 6 and snap.workers[0].id == 5
    s2.close()


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        open_store(f"sqlite:///{path}").open()


def test_locked_file_is_a_clear_error(tmp_path):
    path = tmp_path / "b.db"
    open_store(f"sqlite:///{path}").open()
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            open_store(f"sqlite:///{path}").open()
    finally:
        holder.rollback()
        holder.close()


def test_second_broker_on_the_same_file_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    first = open_store(url)
    first.open()
    with pytest.raises(StoreError, match=r"in use by another broker \(pid \d+\)"):
        open_store(url).open()
    first.close()
    second = open_store(url)  # free again once the first one closed
    second.open()
    second.close()


def test_unknown_store_url():
    with pytest.raises(StoreError, match="unknown store"):
        open_store("redis://x")


def sched(id_, state="active", **kw):
    fields = dict(
        id=id_,
        state=state,
        queue="reports",
        headers="nohaste,run_count:3",
        interval=-1,
        cron="*/5 * * * *",
        body=b'["run", {"path": "m", "callable": "f"}]',
        anchor=1_700_000_000_123,
        created=1.5,
        updated=1.5,
    )
    return ScheduleRecord(**{**fields, **kw})


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_schedules_are_upserted_and_only_active_ones_restored(kind, tmp_path):
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/b.db"
    store = open_store(url)
    store.open()
    store.commit([rec("t")], [], {}, [sched("a"), sched("b"), sched("gone")])
    later = sched("a", last_tick=1_700_000_300_000, last_run=1, runs=2, owner="e")
    store.commit([], [], {}, [later, sched("gone", "finished")])
    if kind == "sqlite":
        store.close()
        store = open_store(url)
    snap = store.open()
    store.close()
    assert sorted(r.id for r in snap.schedules) == ["a", "b"]
    assert next(r for r in snap.schedules if r.id == "a") == later


def test_an_update_writes_what_changes_and_keeps_the_rest(store):
    store.commit([rec("a", label="x")], [], {})
    done = rec("a", "succeeded", attempts=1, worker_uuid="w", result=b'{"value": 2}', label="x")
    store.commit([], [], {}, updates=[done])
    got = store.get_job("a")
    assert got == done
    assert [j.id for j in store.query_jobs(JobQuery(states=["succeeded"]))] == ["a"]
    assert store.query_jobs(JobQuery(states=["queued"])) == []
    assert [j.id for j in store.query_jobs(JobQuery(queue="default", label="x"))] == ["a"]


def test_new_records_and_updates_of_them_in_one_commit(store):
    # A batch written again after a failure holds a job's first record and its updates.
    store.commit([rec("a")], [], {}, updates=[rec("a", "running"), rec("a", "succeeded")])
    assert store.get_job("a").state == "succeeded"


# ---------------------------------------------------------------- checkpoints


def _big(id_: str, body: bytes) -> JobRecord:
    return JobRecord(id=id_, queue="default", state="queued", headers="", body=body,
                     submitter=b"c", submitted=1.0)  # fmt: skip


def _until(predicate, timeout: float = 20.0, step=lambda: time.sleep(0.01)) -> None:
    """Poll ``predicate`` (calling ``step`` between looks) until it holds or time is up."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        step()


def test_sqlite_commits_never_checkpoint_its_thread_does(tmp_path):
    s = SQLiteStore(str(tmp_path / "b.db"), checkpoint_interval=0.02)
    s.open()
    try:
        # SQLite's own checkpoint would run inside a commit now and then.
        assert s._write.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        before = os.path.getsize(tmp_path / "b.db")
        s.commit([_big(f"j{i}", b"x" * 4096) for i in range(200)], [], {})
        # The database file itself grows only when a checkpoint copies the log into it.
        thread = s._checkpointer
        _until(lambda: thread.runs["PASSIVE"] >= 1)
        assert os.path.getsize(tmp_path / "b.db") > before + 400_000
    finally:
        s.close()
    assert s._checkpointer is None


def test_sqlite_log_starts_over_under_steady_commits_and_loses_nothing(tmp_path):
    path = str(tmp_path / "b.db")
    s = SQLiteStore(path, checkpoint_interval=0.01, wal_limit=256 << 10)
    s.open()
    thread = s._checkpointer
    n = 0

    def commit_more() -> None:
        nonlocal n
        s.commit([_big(f"j{n}", os.urandom(8192))], [], {})  # 3 pages or more each
        n += 1

    try:
        # Commit without pause (a passive checkpoint alone never completes then)
        # until the log holds 256 KiB and has been copied while no commit ran.
        _until(lambda: thread.runs["RESTART"] >= 1, step=commit_more)
        commit_more()  # this one starts the log again
        look = sqlite3.connect(path)
        try:
            _, frames, _ = look.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            look.close()
        assert 3 * n > 64 and frames < 32  # the frames of the last commit or two, not all
    finally:
        s.close()
    assert not thread.is_alive()
    again = SQLiteStore(path)
    snap = again.open()
    try:
        assert len(snap.jobs) == n  # every committed job is there after reopening
    finally:
        again.close()
