"""Job streams in the broker, sans-IO: the core, the hub and their glue, no sockets."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.broker.streams import BrokerStreams
from corral.protocol import PROTOCOL, Inform, Listen, Stream, new_msgid, parse
from corral.store.memory import MemoryStore
from corral.store.sqlite import SQLiteStore
from corral.streams.lines import LineBuffer, LineError, parse_request
from corral.streams.messages import decode_items
from tests.unit.test_broker_core import BODY


class Broker:
    """A core with streams and a store, committed by hand like the shell does."""

    def __init__(self, store=None) -> None:
        self.core = BrokerCore(BrokerConfig())
        self.streams = BrokerStreams(self.core, token="admin-token")
        self.store = store or MemoryStore()
        self.now = 1000.0

    def commit(self) -> None:
        jobs, workers, meta = self.core.take_changes()
        self.streams.note_jobs(jobs)
        batch, marks = self.streams.take_changes()
        self.store.commit(jobs, workers, meta, streams=batch)
        self.core.released(self.core.acks)
        self.core.acks = []
        self.streams.committed(marks)
        self.streams.pump()

    def sent(self):
        self.streams.pump()
        out, self.core.outbox = self.core.outbox, []
        return [(dest, ident, parse(frames)) for dest, ident, frames in out]

    def deliveries(self, identity=b"client"):
        items = []
        for dest, ident, msg in self.sent():
            if dest is Dest.FRONTEND and ident == identity and isinstance(msg, Stream):
                items += decode_items(msg.batch)
        return items

    def worker(self, ident=b"w1"):
        self.core.on_backend(
            ident, Inform(new_msgid(), ((10, "default"),), "worker", {}).to_frames(), self.now
        )
        self.core.on_backend(ident, [b"", PROTOCOL, b"READY", b"r"], self.now)

    def submit(self, client=b"client"):
        msgid = new_msgid()
        self.core.on_frontend(
            client,
            [b"", PROTOCOL, b"REQUEST", msgid.encode(), b"default", b"reply-requested", BODY],
            self.now,
        )
        return msgid

    def put(self, ident, job_id, entries, run="run-1", pseq=1):
        batch = json.dumps([[job_id, run, pseq, entries]]).encode()
        self.core.on_backend(ident, Stream(new_msgid(), "", batch).to_frames(), self.now)

    def listen(self, job_id, after=None, window=1000, client=b"client"):
        msg = Listen(new_msgid(), "listen", {"stream": job_id, "after": after, "window": window})
        self.core.on_frontend(client, msg.to_frames(), self.now)
        return msg.msgid

    def finish(self, ident, job_id, result=b'{"value": 42}'):
        self.core.on_backend(
            ident, [b"", PROTOCOL, b"REPLY", b"x", result, job_id.encode()], self.now
        )


def log(text):
    return {"kind": "log", "text": text}


def test_the_worker_running_a_job_streams_to_its_listeners_and_the_end_closes():
    b = Broker()
    b.worker()
    job = b.submit()
    b.commit()
    b.sent()
    b.listen(job)
    header = b.deliveries()
    assert [type(m).__name__ for m in header] == ["Header"] and header[0].seq == 0
    b.put(b"w1", job, [log("a"), {"kind": "progress", "done": 1, "total": 2}])
    assert b.deliveries() == []  # not before the store has it
    b.commit()
    got = b.deliveries()
    assert [(m.seq, type(m).__name__) for m in got] == [(1, "Log"), (2, "Progress")]
    b.finish(b"w1", job)
    b.commit()
    (close,) = b.deliveries()
    assert close.seq == 3 and close.state == "succeeded" and close.outcome == {"value": 42}
    assert b.store.get_stream(job).closed is not None


def test_stream_from_an_unknown_worker_is_refused():
    b = Broker()
    b.put(b"stranger", "job", [log("x")])
    (out,) = b.sent()
    assert out[2].command.value == "ERROR" and out[2].reason == "unknown-worker"


def test_only_the_worker_holding_the_job_may_put():
    b = Broker()
    b.worker(b"w1")
    b.worker(b"w2")
    job = b.submit()
    holder = b.core.jobs[job].worker.identity
    other = b"w2" if holder == b"w1" else b"w1"
    b.put(other, job, [log("not mine")])
    b.put(holder, "no-such-job", [log("x")])
    assert b.streams.stats["entries_not_holder"] == 2
    assert job not in b.streams.hub.streams


def test_bad_batches_are_refused_counted_and_the_broker_goes_on():
    b = Broker()
    b.worker()
    job = b.submit()
    for batch in (b"nope", b"{}", b'[["j", "r", 0, []]]', b'[["j","r",1,[{"kind":"x"}]]]'):
        b.core.on_backend(b"w1", Stream(new_msgid(), "", batch).to_frames(), b.now)
    assert b.core.stats.malformed["bad-stream"] == 4
    assert all(m.reason == "bad-stream" for _, _, m in b.sent() if m.command.value == "ERROR")
    b.put(b"w1", job, [log("fine")])
    assert b.streams.hub.get(job).seq == 1


def test_entries_sent_again_after_a_reconnect_are_taken_once():
    b = Broker()
    b.worker()
    job = b.submit()
    b.put(b"w1", job, [log("1"), log("2"), log("3")], pseq=1)
    b.put(b"w1", job, [log("2"), log("3"), log("4")], pseq=2)
    assert b.streams.hub.get(job).seq == 4
    b.put(b"w1", job, [log("7")], pseq=7)  # 5 and 6 never arrived: said so
    stream = b.streams.hub.get(job)
    assert stream.seq == 6 and b"were lost" in stream.items[-2]
    b.put(b"w1", job, [log("again")], run="run-2", pseq=1)  # a new run of the job
    assert stream.seq == 7


def test_listen_resumes_after_seq_and_unknown_streams_close():
    b = Broker()
    b.worker()
    job = b.submit()
    b.put(b"w1", job, [log(str(i)) for i in range(5)])
    b.commit()
    b.sent()
    b.listen(job, after=3)
    assert [m.seq for m in b.deliveries()] == [4, 5]
    b.listen(job, after=99)
    (close,) = b.deliveries()
    assert close.reason == "bad-after" and close.seq is None
    b.listen("never-heard-of")
    assert b.streams.loads == ["never-heard-of"]
    b.streams.loads.clear()
    b.streams.loaded("never-heard-of", None, None)
    (close,) = b.deliveries()
    assert close.reason == "unknown"


def test_a_finished_job_without_a_stream_is_read_back_with_its_outcome():
    b = Broker()
    b.worker()
    job = b.submit()
    b.finish(b"w1", job, b'{"error": {"type": "E", "message": "m", "traceback": ""}}')
    b.commit()
    b.sent()
    b.listen(job)
    b.streams.loads.clear()
    b.streams.loaded(job, None, b.store.get_job(job))
    header, close = b.deliveries()
    assert header.close.state == "failed" and close.outcome["error"]["type"] == "E"


def test_window_credit_and_overflow_over_listen():
    b = Broker()
    b.streams.hub.config.listener_queue = 20
    b.worker()
    job = b.submit()
    b.commit()
    b.sent()
    ref = b.listen(job, window=5)
    b.deliveries()
    b.put(b"w1", job, [log(str(i)) for i in range(10)])
    b.commit()
    assert [m.seq for m in b.deliveries()] == [1, 2, 3, 4, 5]
    credit = Listen(new_msgid(), "credit", {"ref": ref, "n": 100})
    b.core.on_frontend(b"client", credit.to_frames(), b.now)
    assert [m.seq for m in b.deliveries()] == [6, 7, 8, 9, 10]
    b.streams.hub.config.history = 5
    b.listen(job, window=1, client=b"slow")
    assert len(b.deliveries(b"slow")) == 1  # the header
    b.put(b"w1", job, [log(str(i)) for i in range(30)], pseq=11)
    b.commit()
    out = b.sent()
    normal = [m for _, ident, m in out if ident == b"client"]
    slow = [decode_items(m.batch) for _, ident, m in out if ident == b"slow"]
    assert sum(len(decode_items(m.batch)) for m in normal) == 30
    assert [x.reason for batch in slow for x in batch if type(x).__name__ == "Close"] == [
        "overflow"
    ]
    b.put(b"w1", job, [log("more")], pseq=41)
    b.commit()
    assert not [m for _, ident, m in b.sent() if ident == b"slow"]  # it hears nothing more


def test_the_submitter_gets_a_token_that_lets_a_network_client_put():
    b = Broker()
    b.worker()
    job = b.submit(b"owner")
    b.sent()
    ask = Listen(new_msgid(), "token", {"stream": job})
    b.core.on_frontend(b"owner", ask.to_frames(), b.now)
    b.core.on_frontend(b"someone-else", ask.to_frames(), b.now)
    answers = {ident: msgspec.json.decode(m.result) for _, ident, m in b.sent()}
    token = answers[b"owner"]["value"]
    assert answers[b"someone-else"]["error"]["type"] == "NotOwner"
    b.streams.connection_made(1)
    put = parse_request(
        json.dumps({"action": "put", "stream": job, "message": "hi", "token": token}).encode()
    )
    b.streams.line_request(1, put, 1)
    assert b.streams.hub.get(job).seq == 1
    bad = parse_request(json.dumps({"action": "put", "stream": job, "message": 1}).encode())
    b.streams.line_request(1, bad, 2)
    wrong = parse_request(
        json.dumps({"action": "header", "stream": job, "message": 1, "token": "x" * 40}).encode()
    )
    b.streams.line_request(1, wrong, 3)
    errors = b"".join(b.streams.tcp_out[1]).splitlines()
    assert [json.loads(e)["line"] for e in errors] == [2, 3]
    assert b.streams.hub.get(job).seq == 1


def test_tcp_listen_and_the_configured_token_for_free_streams():
    b = Broker()
    b.streams.connection_made(1)
    b.streams.connection_made(2)

    def send(conn, **request):
        b.streams.line_request(conn, parse_request(json.dumps(request).encode()), 1)

    send(1, action="header", stream="board", message={"title": "t"}, token="admin-token")
    send(1, action="put", stream="board", message={"kind": "log", "text": "x"}, token="admin-token")
    b.commit()
    send(2, action="listen", stream="board")
    b.streams.pump()
    lines = [json.loads(x) for x in b"".join(b.streams.tcp_out.pop(2)).splitlines()]
    assert [x["action"] for x in lines] == ["header"]
    assert lines[0]["message"]["value"] == {"title": "t"} and lines[0]["message"]["seq"] == 2
    send(1, action="close", stream="board", token="admin-token")
    b.commit()
    lines = [json.loads(x) for x in b"".join(b.streams.tcp_out.pop(2)).splitlines()]
    assert [x["action"] for x in lines] == ["close"] and lines[0]["message"]["seq"] == 3
    send(1, action="put", stream="other", message=1, token="not-it")
    assert b"not-allowed" in b"".join(b.streams.tcp_out.pop(1))


def test_streams_survive_a_restart_in_sqlite(tmp_path):
    store = SQLiteStore(str(tmp_path / "b.db"))
    store.open()
    b = Broker(store)
    b.worker()
    job = b.submit()
    b.put(b"w1", job, [log(str(i)) for i in range(1500)])
    b.commit()
    secret = b.streams.secret
    store.close()
    store = SQLiteStore(str(tmp_path / "b.db"))
    snapshot = store.open()
    b2 = Broker(store)
    b2.core.restore(snapshot, b2.now)
    b2.streams.restore(*store.load_streams())
    assert b2.streams.secret == secret
    stream = b2.streams.hub.get(job)
    assert stream.seq == 1500 and stream.producer == "run-1" and len(stream.items) == 1000
    b2.listen(job, after=1200)
    assert [m.seq for m in b2.deliveries()] == list(range(1201, 1501))
    store.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_line_parser_refuses_garbage_with_a_reason(data):
    buffer = LineBuffer(max_line=200)
    for item in buffer.feed(data + b"\n"):
        if isinstance(item, LineError):
            continue
        try:
            request = parse_request(item)
        except LineError as exc:
            assert exc.reason and exc.detail
        else:
            assert request.action in ("header", "delete", "put", "listen", "hangup", "close")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["action", "stream", "message", "after", "token", "x"]),
        st.one_of(
            st.sampled_from(["put", "listen", "header", "hangup", "close", "delete", "job"]),
            st.integers(-5, 5),
            st.none(),
            st.text(max_size=5),
            st.lists(st.integers(), max_size=2),
            st.dictionaries(st.sampled_from(["kind", "text", "done"]), st.text(max_size=3)),
        ),
    )
)
def test_any_request_object_is_served_or_refused_and_the_broker_goes_on(request_fields):
    b = Broker()
    b.worker()
    job = b.submit()
    b.streams.connection_made(1)
    line = json.dumps(request_fields).encode()
    try:
        request = parse_request(line)
    except LineError as exc:
        b.streams.bad_line(1, exc, 1)
    else:
        b.streams.line_request(1, request, 1)
    b.commit()
    b.put(b.core.jobs[job].worker.identity, job, [log("still serving")])
    b.commit()
    assert b.streams.hub.get(job).committed >= 1


@pytest.mark.parametrize(
    "params",
    [
        {"op": "listen"},
        {"op": "listen", "stream": 5},
        {"op": "listen", "stream": "j", "after": "x"},
        {"op": "listen", "stream": "j", "window": 0},
        {"op": "credit", "ref": "r", "n": -1},
        {"op": "credit", "ref": 7, "n": 1},
        {"op": "hangup", "ref": None},
        {"op": "token"},
    ],
)
def test_bad_listen_requests_are_refused(params):
    b = Broker()
    op = params.pop("op")
    b.core.on_frontend(b"c", Listen(new_msgid(), op, params).to_frames(), b.now)
    (out,) = b.sent()
    assert out[2].reason == "bad-listen"
    assert b.core.stats.malformed["bad-listen"] == 1
