"""eMQP parsing and building: round trips, EventMQ's exact frames, and fuzzing."""

from __future__ import annotations

import json
import os
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.protocol import (
    PROTOCOL,
    Abort,
    Ack,
    Command,
    Disconnect,
    Error,
    Heartbeat,
    Hello,
    Inform,
    Kbye,
    Listen,
    ProtocolError,
    Publish,
    Query,
    Ready,
    Recall,
    Release,
    ReloadKeys,
    Reply,
    Request,
    RunParams,
    Schedule,
    ShowSchedulers,
    ShowWorkers,
    Status,
    Stream,
    Unschedule,
    encode_body,
    parse,
    parse_headers,
)

BODY = encode_body(RunParams("pkg.mod", "fn", [1, 2], {"x": 3}))


def frames(cmd: str, *rest: bytes, msgid: bytes = b"m-1") -> list[bytes]:
    return [b"", PROTOCOL, cmd.encode(), msgid, *rest]


ALL_MESSAGES = [
    Inform("a", ((20, "heavy"), (10, "default")), "worker"),
    Inform("a", None, "scheduler"),
    Inform("a", ((10, "default"),), "worker", {"running": ["j1"]}),
    Ack("b", "a"),
    Ready("c"),
    Request("d", "default", parse_headers("reply-requested,timeout:5"), BODY),
    Reply("e", "d"),
    Reply("e", "d", b'{"value": 3}'),
    Reply("e", "d", b'{"value": 3}', ready=True),
    Reply("e", "d", b'{"error": {"type": "E", "message": "m", "traceback": "t"}}'),
    Heartbeat("f", 1700000000.25),
    Disconnect("g"),
    Kbye("h"),
    Kbye("h", draining=True),
    Schedule("i", "default", parse_headers("nohaste,run_count:3"), 60, BODY, ""),
    Schedule("i", "default", parse_headers(""), -1, BODY, "*/5 * * * *"),
    Unschedule("j", "default", parse_headers(""), -1, BODY, ""),
    Publish("k", "topic", b'{"a": 1}'),
    Status("l"),
    ShowWorkers("m"),
    ShowSchedulers("n"),
    Error("o", "bad-json", "detail", "ref"),
    Query("p", "job", {"id": "abc"}),
    Hello("q"),
    Abort("r", "job-1", "cancelled"),
    Recall("x", "job-1"),
    Release("y", "job-1"),
    Ack("s", "a", {"streams": 1}),
    Stream("t", "", b'[["job-1", "run", 1, [{"kind": "log", "text": "x"}]]]'),
    Stream("u", "listen-1", b'[{"kind": "header", "seq": 0}]'),
    Listen("v", "listen", {"stream": "job-1", "after": 3, "window": 100}),
    Listen("w", "credit", {"ref": "v", "n": 50}),
    ReloadKeys("z"),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: m.command.value)
def test_every_command_round_trips(msg):
    assert parse(msg.to_frames()) == msg


def test_every_command_is_covered():
    assert {m.command for m in ALL_MESSAGES} == set(Command)


def test_eventmq_request_frames_as_sent_by_defer_job():
    body = json.dumps(
        [
            "run",
            {
                "callable": "fn",
                "path": "pkg.mod",
                "args": [1],
                "kwargs": {},
                "class_args": [],
                "class_kwargs": {},
            },
        ]
    ).encode()
    msg = parse(frames("REQUEST", b"default", b"reply-requested,retry-count:2,timeout:0", body))
    assert isinstance(msg, Request)
    assert msg.headers.reply_requested and msg.headers.retry_count == 2
    assert msg.headers.timeout == 0
    assert msg.params().callable == "fn" and msg.params().args == [1]


def test_eventmq_inform_without_queues():
    msg = parse(frames("INFORM", b"", b"worker"))
    assert isinstance(msg, Inform) and msg.queues is None and msg.kind == "worker"


def test_admin_request_without_msgid_prefix_rules():
    assert isinstance(parse(frames("STATUS", msgid=b"admin:123")), Status)


class TestHeaders:
    def test_tokens_not_substrings(self):
        h = parse_headers("retry-count:3,x-reply-requested-not")
        assert h.retry_count == 3
        assert not h.reply_requested
        assert h.extra == ("x-reply-requested-not",)

    def test_all_known(self):
        h = parse_headers("reply-requested, guarantee,nohaste,timeout:2.5,run_count:-1")
        assert h.reply_requested and h.guarantee and h.nohaste
        assert h.timeout == 2.5 and h.run_count is None

    def test_encode_round_trip(self):
        text = "reply-requested,guarantee,retry-count:2,timeout:3,label:x"
        assert parse_headers(parse_headers(text).encode()) == parse_headers(text)

    def test_get_extension(self):
        assert parse_headers("label:abc,flag").get("label") == "abc"
        assert parse_headers("label:abc,flag").get("flag") == ""
        assert parse_headers("").get("label") is None

    @pytest.mark.parametrize(
        "bad",
        [
            "retry-count:x",
            "retry-count:-1",
            "timeout:abc",
            "timeout:-1",
            "timeout:inf",
            "run_count:0",
            "guarantee:yes",
            "timeout:nan",
        ],
    )
    def test_bad_values(self, bad):
        with pytest.raises(ProtocolError) as info:
            parse_headers(bad)
        assert info.value.reason == "bad-header"


@pytest.mark.parametrize(
    ("frames_", "reason"),
    [
        ([b"", PROTOCOL, b"READY"], "bad-frames"),
        ([b"x", PROTOCOL, b"READY", b"1"], "bad-frames"),
        ([b"", b"eMQP/2.0", b"READY", b"1"], "bad-version"),
        (frames("NOPE"), "unknown-command"),
        (frames("READY", msgid=b"\xff\xfe"), "bad-utf8"),
        (frames("REQUEST", b"default", b"", b"{not json"), "bad-body"),
        (frames("REQUEST", b"default", b"", b'["stop", {}]'), "bad-body"),
        (frames("REQUEST", b"default", b"", b'["run", {"path": 1}]'), "bad-body"),
        (frames("REQUEST", b"", b"", BODY), "bad-queue"),
        (frames("REQUEST", b"default", b"\xff", BODY), "bad-utf8"),
        (frames("REQUEST", b"default", BODY), "bad-frames"),
        (frames("REPLY", b'{"value": ', b"id"), "bad-result"),
        (frames("REPLY", b"[1]", b"id"), "bad-result"),
        (frames("REPLY", b'{"value": 1}', b"id", b"later"), "bad-frames"),
        (frames("INFORM", b"[[1,2]]", b"worker"), "bad-json"),
        (frames("INFORM", b"", b"robot"), "bad-inform"),
        (frames("INFORM", b"", b"worker", b'{"running": 3}'), "bad-inform"),
        (frames("INFORM", b"", b"worker", b'{"running": [["a"]]}'), "bad-inform"),
        (frames("INFORM", b"", b"worker", b'{"running": [""]}'), "bad-inform"),
        (frames("ABORT"), "bad-frames"),
        (frames("RECALL"), "bad-frames"),
        (frames("RELEASE", b""), "bad-frames"),
        (frames("RELEASE", b"\xff"), "bad-utf8"),
        (frames("ABORT", b"\xff"), "bad-utf8"),
        (frames("HEARTBEAT", b"soon"), "bad-heartbeat"),
        (frames("SCHEDULE", b"q", b"", b"x", BODY, b""), "bad-schedule"),
        (frames("SCHEDULE", b"q", b"", b"-1", BODY, b""), "bad-schedule"),
        (frames("SCHEDULE", b"q", b"", b"-1", BODY, b"* * *"), "bad-schedule"),
        (frames("PUBLISH", b"t", b"{"), "bad-json"),
        (frames("PUBLISH", b"t", b"[" * 5000 + b"]" * 5000), "bad-json"),
        (
            frames(
                "REQUEST",
                b"q",
                b"",
                b'["run", {"path": "a", "callable": "b", "args": '
                + b"[" * 5000
                + b"]" * 5000
                + b"}]",
            ),
            "bad-body",
        ),
        (frames("REPLY", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"id"), "bad-result"),
        (frames("QUERY", b'{"op": "job", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}"), "bad-json"),
    ],
)
def test_malformed_reasons(frames_, reason):
    with pytest.raises(ProtocolError) as info:
        parse(frames_)
    assert info.value.reason == reason


def test_oversized_frame_refused():
    with pytest.raises(ProtocolError) as info:
        parse(frames("REQUEST", b"default", b"", b"x" * 2000), max_frame=1000)
    assert info.value.reason == "oversized"


def test_msgid_is_reported_when_known():
    with pytest.raises(ProtocolError) as info:
        parse(frames("REQUEST", b"default", b"", b"{", msgid=b"abc"))
    assert info.value.msgid == "abc"


# ---------------------------------------------------------------- ids


def test_new_msgid_gives_uuid4_texts_all_different() -> None:
    from corral.protocol import new_msgid

    ids = [new_msgid() for _ in range(2000)]  # several refills of the buffer
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert {text[19] for text in ids} == set("89ab")  # the variant keeps 2 random bits


def test_new_msgid_never_repeats_across_threads() -> None:
    from corral.protocol import new_msgid

    got: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(got))

    def take(out: list[str]) -> None:
        start.wait()
        out.extend(new_msgid() for _ in range(5000))

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [text for out in got for text in out]
    assert len(ids) == 40000 and len(set(ids)) == 40000


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    from corral.protocol import new_msgid

    new_msgid()  # the parent has ids made and waiting
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its first 300 ids, then leave without cleanup
        try:
            os.write(write, "\n".join(new_msgid() for _ in range(300)).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = {new_msgid() for _ in range(300)}
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    assert len(theirs) == 300 and not mine & theirs


# ---------------------------------------------------------------- properties

any_frames = st.lists(st.binary(max_size=64), max_size=12)
commands = st.sampled_from([c.value.encode() for c in Command] + [b"", b"request", b"\xff"])
frame_values = st.one_of(
    st.binary(max_size=48),
    st.sampled_from(
        [
            b"",
            b"default",
            b"worker",
            b"scheduler",
            b'[[10,"default"]]',
            b"-1",
            b"60",
            b"* * * * *",
            BODY,
            b'{"value": 1}',
            b'{"error": {"type": "E"}}',
            b"reply-requested,timeout:3",
            b"retry-count:x",
            b"null",
            b"[]",
            b"{}",
        ]
    ),
)
near_valid = st.builds(
    lambda cmd, msgid, rest: [b"", PROTOCOL, cmd, msgid, *rest],
    commands,
    st.one_of(st.just(b"m"), st.binary(max_size=8)),
    st.lists(frame_values, max_size=7),
)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(any_frames, near_valid))
def test_any_bytes_parse_or_raise_protocol_error(frames_):
    try:
        msg = parse(frames_, max_frame=40)
    except ProtocolError as exc:
        assert exc.reason and isinstance(exc.reason, str)
    else:
        # What parses must build back into frames that parse to the same message.
        assert parse(msg.to_frames()) == msg


@settings(max_examples=300)
@given(
    queue=st.text(min_size=1, max_size=20).filter(str.isprintable),
    retry=st.integers(0, 100),
    timeout=st.integers(0, 10_000),
    args=st.lists(
        st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=10), st.none(), st.booleans()),
        max_size=5,
    ),
)
def test_request_round_trip_property(queue, retry, timeout, args):
    headers = parse_headers(f"reply-requested,retry-count:{retry},timeout:{timeout}")
    msg = Request("id", queue, headers, encode_body(RunParams("m", "f", args)))
    back = parse(msg.to_frames())
    assert back == msg
    assert back.params().args == args
