"""Control records whose text was not written by the ingest: bounded, never a crash.

Before: a CONNECTED or DISCONNECTED record whose text is ``[`` x 992 raised RecursionError out of
the normaliser (the backtest died, and the connection id had already switched).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotewatch.core.records import FeedStatus, Gap, RawKind
from quotewatch.domain.venue.normaliser import (
    CONNECTING,
    CONTROL_DETAIL_MAX_CHARS,
    RECONNECTING,
    Normaliser,
    control_text,
    parse_control_text,
)
from tests.records import body
from tests.unit.domain.venue.test_normaliser import Log


@pytest.mark.parametrize("kind", ["CONNECTED", "DISCONNECTED"])
@pytest.mark.parametrize("text", ["[" * 992, "{" * 5000, '{"state": ' * 3000, "[" * 100_000])
def test_deeply_nested_control_text_is_a_foreign_text_not_a_crash(kind: RawKind, text: str) -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    out = normaliser.process(log.record(kind, text))
    assert out.rejects == []
    statuses = [body(e, FeedStatus) for e in out.events if e.kind == "STATUS"]
    assert {e.symbol for e in out.events if e.kind == "STATUS"} == {"BTC-USD", "ETH-USD"}
    default = CONNECTING if kind == "CONNECTED" else RECONNECTING
    assert {status.state for status in statuses} == {default}
    assert all(len(status.detail) <= CONTROL_DETAIL_MAX_CHARS + 40 for status in statuses)
    assert all(len(body(e, Gap).detail) < CONTROL_DETAIL_MAX_CHARS + 200 for e in out.events if e.kind == "GAP")


def test_the_ingests_own_texts_are_read_as_before() -> None:
    assert parse_control_text(control_text("BACKOFF", "connect refused", delay_seconds=1.5), "X") == (
        "BACKOFF",
        "connect refused",
    )
    long_reason = "r" * 5000
    state, detail = parse_control_text(control_text("RECONNECTING", long_reason), "X")
    assert state == "RECONNECTING"
    assert detail.startswith("r" * CONTROL_DETAIL_MAX_CHARS)
    assert detail.endswith("(5000 characters)")


def test_an_overflow_text_is_clipped_in_its_gaps() -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.l2("snapshot", "BTC-USD", ("bid", "1", "1")))
    out = normaliser.process(log.record("OVERFLOW", "x" * 1_000_000))
    (gap,) = [body(e, Gap) for e in out.events if e.kind == "GAP"]
    assert len(gap.detail) < CONTROL_DETAIL_MAX_CHARS + 200


_texts = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(["[", "]", "{", "}", '"', "\\", ",", ":", '"state"', '"CONNECTING"', "1e999"]), max_size=3000
    ).map("".join),
)


@hypothesis_settings(max_examples=200)
@given(kind=st.sampled_from(["CONNECTED", "DISCONNECTED", "OVERFLOW"]), text=_texts)
def test_control_text_fuzz(kind: RawKind, text: str) -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    out = normaliser.process(log.record(kind, text))
    assert out.rejects == []
    for event in out.events:
        detail = event.status.detail if event.status else event.gap.detail if event.gap else ""
        assert len(detail) < CONTROL_DETAIL_MAX_CHARS + 200
