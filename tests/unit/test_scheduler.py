"""Schedule ids, tick ids, cadences and the timetable: pure functions of the given time."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.protocol import ProtocolError, RunParams, encode_body, parse_headers
from corral.protocol import Schedule as ScheduleMessage
from corral.scheduler.cadence import CronCadence, IntervalCadence, zone
from corral.scheduler.ids import ms_to_iso, parse_tick_id, schedule_id, tick_id
from corral.scheduler.model import from_message
from corral.scheduler.timetable import Timetable

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def ms(text: str, tz: ZoneInfo = UTC) -> int:
    return round(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)


def local(t: int, tz: ZoneInfo = BERLIN) -> str:
    return datetime.fromtimestamp(t / 1000, tz).isoformat()


# ---------------------------------------------------------------- ids


def test_schedule_id_is_eventmqs_hash_of_its_sample_job():
    # EventMQ's own test pins this value for this body, in either key order.
    sample = {
        "path": "test",
        "args": [33, "asdf"],
        "kwargs": {"zeta": "Z", "alpha": "α"},
        "class_args": [0],
        "class_kwargs": {"donkey": True, "apple": False},
        "callable": "do_the_thing",
    }
    reordered = dict(reversed(list(sample.items())))
    for params in (sample, reordered):
        body = json.dumps(["run", params]).encode()
        assert schedule_id(body) == "4658982cab9d32bf1ef9113a9d8bdec01775e2bc"


def test_schedule_id_ignores_defaults_spelled_out_or_not():
    short = encode_body(RunParams("pkg.mod", "fn"))  # omits empty args/kwargs
    full = json.dumps(
        ["run", {"path": "pkg.mod", "callable": "fn", "args": [], "kwargs": {}}]
    ).encode()
    assert schedule_id(short) == schedule_id(full)
    assert schedule_id(short) != schedule_id(encode_body(RunParams("pkg.mod", "fn", [1])))


def test_schedule_id_of_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        schedule_id(b'["run", {"path": "x"}]')


@given(st.integers(0, 4102444800000))
def test_tick_ids_round_trip_exactly(t):
    sid = "a" * 40
    assert parse_tick_id(tick_id(sid, t)) == (sid, t)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 40,
        "A" * 40 + "@2025-01-01T00:00:00.000Z",
        "a" * 40 + "@2025-02-30T00:00:00.000Z",
        "a" * 40 + "@2025-01-01T00:00:00Z",
        "a" * 40 + "@2025-01-01T24:00:00.000Z",
        "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    ],
)
def test_non_tick_ids(text):
    assert parse_tick_id(text) is None


def test_tick_id_is_readable():
    assert ms_to_iso(ms("2025-03-30T01:00:00.123")) == "2025-03-30T01:00:00.123Z"


# ---------------------------------------------------------------- cadences


def test_interval_grid_is_anchored():
    c = IntervalCadence(1_000, 10_000)
    assert [c.after(1_000), c.after(10_999), c.after(11_000)] == [11_000, 11_000, 21_000]
    assert [c.at_or_before(10_999), c.at_or_before(11_000)] == [1_000, 11_000]
    assert c.contains(31_000) and not c.contains(31_001)


def test_cron_in_utc():
    c = CronCadence("*/5 * * * *", UTC)
    t = ms("2025-01-01T10:00:00")
    assert c.after(t) == ms("2025-01-01T10:05:00")
    assert c.after(t - 1) == t
    assert c.at_or_before(t) == t
    assert c.at_or_before(t - 1) == ms("2025-01-01T09:55:00")
    assert c.contains(t) and not c.contains(t + 1000)


def test_cron_reads_wall_clock_in_its_zone():
    c = CronCadence("0 9 * * *", ZoneInfo("America/New_York"))
    assert c.after(ms("2025-01-01T00:00:00")) == ms("2025-01-01T14:00:00")  # EST
    assert c.after(ms("2025-07-01T00:00:00")) == ms("2025-07-01T13:00:00")  # EDT


def _series(c: CronCadence, start: int, end: int) -> list[str]:
    out, t = [], start
    while (t := c.after(t)) is not None and t < end:
        out.append(local(t))
    return out


def test_cron_daily_across_spring_forward_runs_once_after_the_gap():
    c = CronCadence("30 2 * * *", BERLIN)
    got = _series(c, ms("2025-03-29T00:00:00", BERLIN), ms("2025-04-01T00:00:00", BERLIN))
    assert got == [
        "2025-03-29T02:30:00+01:00",
        "2025-03-30T03:00:00+02:00",  # 02:30 does not exist that night
        "2025-03-31T02:30:00+02:00",
    ]


def test_cron_daily_across_fall_back_runs_once():
    c = CronCadence("30 2 * * *", BERLIN)
    got = _series(c, ms("2025-10-25T00:00:00", BERLIN), ms("2025-10-28T00:00:00", BERLIN))
    assert got == [
        "2025-10-25T02:30:00+02:00",
        "2025-10-26T02:30:00+02:00",  # and not again at 02:30+01:00
        "2025-10-27T02:30:00+01:00",
    ]
    # Looking backwards agrees.
    assert local(c.at_or_before(ms("2025-10-26T12:00:00", BERLIN))) == got[1]


def test_cron_hourly_across_fall_back_runs_every_real_hour():
    c = CronCadence("0 * * * *", BERLIN)
    start, end = ms("2025-10-26T00:30:00", BERLIN), ms("2025-10-26T04:30:00", BERLIN)
    got = _series(c, start, end)
    assert got == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T02:00:00+01:00",
        "2025-10-26T03:00:00+01:00",
        "2025-10-26T04:00:00+01:00",
    ]


def test_cron_hourly_across_spring_forward_skips_the_missing_hour():
    c = CronCadence("0 * * * *", BERLIN)
    got = _series(c, ms("2025-03-30T00:30:00", BERLIN), ms("2025-03-30T04:30:00", BERLIN))
    assert got == [
        "2025-03-30T01:00:00+01:00",
        "2025-03-30T03:00:00+02:00",
        "2025-03-30T04:00:00+02:00",
    ]


@pytest.mark.parametrize("expr", ["* * *", "61 * * * *", "a b c d e", "0 0 30 2 *"])
def test_bad_or_empty_cron_refused(expr):
    with pytest.raises(ProtocolError) as info:
        CronCadence(expr, UTC)
    assert info.value.reason == "bad-schedule"


def test_unknown_zone_explained():
    with pytest.raises(ValueError, match="IANA"):
        zone("Mars/Olympus")


# ---------------------------------------------------------------- schedules and the timetable

BODY = encode_body(RunParams("pkg.mod", "fn"))


def make(interval=10, cron="", headers="", anchor=0, tz=UTC):
    msg = ScheduleMessage("m", "default", parse_headers(headers), interval, BODY, cron)
    return from_message(msg, tz, anchor)


def test_haste_tick_is_the_anchor_then_the_grid():
    s = make(anchor=500)
    assert [s.next_valid(None), s.next_valid(500), s.next_valid(10_499)] == [500, 10_500, 10_500]
    assert s.is_tick(500) and s.is_tick(20_500) and not s.is_tick(20_000)


def test_nohaste_first_tick_is_one_interval_later():
    s = make(headers="nohaste", anchor=500)
    assert s.next_valid(None) == 10_500
    assert not s.is_tick(500)


def test_cron_haste_tick_is_off_the_grid():
    anchor = ms("2025-01-01T10:02:00")
    s = make(interval=-1, cron="*/5 * * * *", anchor=anchor)
    assert s.next_valid(None) == anchor and s.is_tick(anchor)
    assert s.next_valid(anchor) == ms("2025-01-01T10:05:00")
    # A cron instant at or before the anchor belongs to no run of this schedule.
    assert not s.is_tick(ms("2025-01-01T10:00:00"))


def test_timetable_coalesces_and_never_repeats():
    table = Timetable()
    s = make(anchor=0)
    table.add(s)
    assert [t for _, t in table.due(0)] == [0]
    assert table.due(0) == []
    # The loop stalled for 35 s: one run, at the latest due tick.
    assert [t for _, t in table.due(35_000)] == [30_000]
    assert table.next_due() == 40_000 and s.runs == 2


def test_timetable_skip_records_without_firing():
    table = Timetable()
    s = make(headers="nohaste", anchor=0)
    table.add(s)
    assert table.skip_missed(25_000) == [(s, 20_000)]
    assert s.runs == 0 and s.last_tick == 20_000 and s.last_run is None
    assert [t for _, t in table.due(30_000)] == [30_000]


def test_unplanned_schedules_are_kept_but_never_due():
    table = Timetable()
    s = make(anchor=0)
    table.add(s, planned=False)
    assert table.due(100_000) == [] and table.next_due() is None
    table.plan(s)
    assert [t for _, t in table.due(100_000)] == [100_000]


def test_shells_follow_a_stepped_wall_clock_but_not_drift(monkeypatch):
    import types

    from corral import _clock

    holder = types.SimpleNamespace(wall_offset=1000.0)
    monkeypatch.setattr(_clock.time, "time", lambda: 1500.5)
    _clock.follow_wall_clock(holder, 500.0)
    assert holder.wall_offset == 1000.0
    monkeypatch.setattr(_clock.time, "time", lambda: 1560.0)  # stepped a minute forward
    _clock.follow_wall_clock(holder, 500.0)
    assert holder.wall_offset == 1060.0
