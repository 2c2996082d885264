"""The connection state machine with an injected clock and random source; the exchange-time estimate."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotewatch.core.clock import FakeClock
from quotewatch.services.ingest.state_machine import (
    ConnectionStateMachine,
    FeedState,
    IllegalTransitionError,
    Transition,
)
from quotewatch.services.ingest.writer import ExchangeClock

S = 1_000_000_000


def machine(clock: FakeClock, seen: list[Transition] | None = None, seed: int = 1) -> ConnectionStateMachine:
    return ConnectionStateMachine(
        backoff_initial_seconds=0.5,
        backoff_max_seconds=8.0,
        backoff_reset_seconds=60.0,
        monotonic_ns=clock.monotonic_ns,
        rng=random.Random(seed),
        on_transition=seen.append if seen is not None else None,
    )


def states(m: ConnectionStateMachine) -> list[tuple[str, str]]:
    return [(t.previous.value, t.state.value) for t in m.history]


def test_the_happy_path_and_a_reconnect() -> None:
    seen: list[Transition] = []
    m = machine(FakeClock(), seen)
    m.connect()
    m.subscribed()
    m.lost("connection closed")
    assert not m.should_back_off()
    assert m.connect() is None  # RECONNECTING stays RECONNECTING while the attempt runs
    m.subscribed()
    m.stop()
    assert states(m) == [
        ("INIT", "CONNECTING"),
        ("CONNECTING", "SUBSCRIBED"),
        ("SUBSCRIBED", "RECONNECTING"),
        ("RECONNECTING", "SUBSCRIBED"),
        ("SUBSCRIBED", "STOPPED"),
    ]
    assert seen == m.history


def test_failures_back_off_exponentially_with_full_jitter_up_to_the_cap() -> None:
    clock = FakeClock()
    m = machine(clock, seed=3)
    caps = []
    for _ in range(8):
        m.connect()
        transition = m.failed("refused")
        caps.append(min(8.0, 0.5 * 2 ** (m.failures - 1)))
        assert 0.0 <= transition.delay_seconds <= caps[-1]
        assert transition.state is FeedState.BACKOFF
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    # Full jitter: the delays are spread over [0, cap], not pinned to it.
    delays = [t.delay_seconds for t in m.history if t.state is FeedState.BACKOFF]
    assert min(delays[4:]) < 4.0 < max(delays[4:])


def test_hours_of_failures_keep_backing_off_at_the_cap() -> None:
    # ~1,000 failed connects in a row is ~4 h of a down exchange at 8-30 s each: 2**1024 used to
    # overflow the float conversion and kill the ingest.
    m = machine(FakeClock(), seed=5)
    for _ in range(3000):
        m.connect()
        transition = m.failed("refused")
        assert 0.0 <= transition.delay_seconds <= 8.0
    assert m.failures == 3000


def test_a_stable_connection_resets_the_backoff_and_a_short_one_counts_as_a_failure() -> None:
    clock = FakeClock()
    m = machine(clock)
    for _ in range(3):
        m.connect()
        m.failed("refused")
    m.connect()
    m.subscribed()
    clock.advance(61 * S)
    m.lost("closed after a stable minute")
    assert m.failures == 0
    m.subscribed()
    clock.advance(2 * S)
    m.lost("closed young")
    assert m.failures == 1
    assert not m.should_back_off()  # one young death: reconnect at once
    m.subscribed()
    clock.advance(2 * S)
    m.lost("closed young again")
    assert m.should_back_off()  # flapping: wait before the next attempt
    transition = m.back_off("flapping")
    assert transition.state is FeedState.BACKOFF
    assert 0.0 <= transition.delay_seconds <= 1.0


def test_a_lost_connection_waits_a_jittered_delay_before_reconnecting() -> None:
    """No thundering herd: every drop waits uniform [0, jitter] (deterministic with the injected rng)."""
    clock = FakeClock()
    m = ConnectionStateMachine(
        backoff_initial_seconds=0.5,
        backoff_max_seconds=8.0,
        backoff_reset_seconds=60.0,
        monotonic_ns=clock.monotonic_ns,
        rng=random.Random(42),
        reconnect_jitter_seconds=3.0,
    )
    expected = random.Random(42)
    delays = []
    m.connect()
    for _ in range(20):
        m.subscribed()
        clock.advance(61 * S)  # stable: the failure count is reset, no backoff
        transition = m.lost("the exchange restarted")
        assert transition.state is FeedState.RECONNECTING
        assert transition.delay_seconds == expected.uniform(0.0, 3.0)
        assert not m.should_back_off()
        delays.append(transition.delay_seconds)
    assert all(0.0 <= d <= 3.0 for d in delays)
    assert len(set(delays)) == len(delays)  # spread, not one fixed delay
    assert max(delays) - min(delays) > 1.5


def test_reconnect_failure_goes_to_backoff() -> None:
    m = machine(FakeClock())
    m.connect()
    m.subscribed()
    m.lost("closed")
    assert m.failed("connect refused").previous is FeedState.RECONNECTING
    assert m.state is FeedState.BACKOFF


@pytest.mark.parametrize(
    "path",
    [[], ["connect"], ["connect", "subscribed"], ["connect", "subscribed", "lost"], ["connect", "failed"]],
)
def test_stop_from_any_state(path: list[str]) -> None:
    m = machine(FakeClock())
    for step in path:
        getattr(m, step)(*(["why"] if step in ("lost", "failed") else []))
    assert m.stop() is not None
    assert m.state is FeedState.STOPPED
    assert m.stop() is None


def test_transitions_outside_the_diagram_are_bugs() -> None:
    m = machine(FakeClock())
    with pytest.raises(IllegalTransitionError):
        m.subscribed()
    with pytest.raises(IllegalTransitionError):
        m.lost("not connected")


@given(st.lists(st.tuples(st.integers(-5 * S, 5 * S), st.integers(1, 10**8)), min_size=1, max_size=50))
def test_the_exchange_clock_never_goes_backwards_and_trails_the_slowest_recent_delivery(
    samples: list[tuple[int, int]],
) -> None:
    clock = ExchangeClock(window_ns=10 * S)
    ts_init = 1_700_000_000 * S
    last = -1
    window: list[tuple[int, int]] = []
    for offset, step in samples:
        ts_init += step
        clock.observe(ts_init + offset, ts_init)
        window = [(t, o) for t, o in [*window, (ts_init, offset)] if t >= ts_init - 10 * S]
        estimate = clock.estimate(ts_init)
        assert estimate >= last
        assert estimate >= ts_init + min(o for _, o in window)
        assert estimate == max(last, ts_init + min(o for _, o in window))
        last = estimate


def test_the_exchange_clock_has_no_estimate_before_an_exchange_time() -> None:
    clock = ExchangeClock()
    assert not clock.ready
    assert clock.last_known() is None
    with pytest.raises(ValueError, match="no exchange time"):
        clock.estimate(123)


def test_a_new_connection_forgets_the_offset_and_keeps_the_last_known_time() -> None:
    """A feed whose clock goes back (a recording served again from its start) is followed at once."""
    clock = ExchangeClock(window_ns=10 * S)
    local = 1_800_000_000 * S
    recorded = 1_500_000_000 * S  # the exchange times are years behind the local clock
    clock.observe(recorded, local)
    assert clock.estimate(local + S) == recorded + S
    clock.new_connection()
    assert not clock.ready
    assert clock.last_known() == recorded + S, "control records of the new connection get it"
    clock.observe(recorded - 60 * S, local + 2 * S)  # the new connection starts a minute earlier
    assert clock.estimate(local + 3 * S) == recorded - 59 * S, "no floor from the previous connection"
    assert clock.last_known() == recorded - 59 * S
