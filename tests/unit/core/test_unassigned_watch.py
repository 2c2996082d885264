"""A loop turn without assigned partitions while the input has data is no sign of life (every stream loop).

The rule lives in the consumer runtime's session (:class:`UnassignedWatch`), so the processor
(book, labeler, inference, ingest's topic mode) and the lake sink's sink mode share it. Manual
clock; the watchdog's action is injected.
"""

from __future__ import annotations

import logging

import pytest

from quotewatch.core.clock import FakeClock
from quotewatch.core.health import Liveness, StuckWatchdog
from quotewatch.core.runtime import UnassignedWatch
from quotewatch.core.runtime.session import INPUT_PROBE_SECONDS, UNASSIGNED_WARN_SECONDS

SECOND = 1_000_000_000
STUCK_EXIT_SECONDS = 60


class Input:
    """The probe's answers: True (data waiting), False (nothing waiting), None (broker silent)."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.asked = 0

    def __call__(self) -> bool | None:
        self.asked += 1
        return self.answer


def turn_for(seconds: int, clock: FakeClock, watch: UnassignedWatch, watchdog: StuckWatchdog, assigned: bool) -> None:
    """One loop turn (and one watchdog check) per second of the manual clock."""
    for _ in range(seconds):
        clock.advance(SECOND)
        watch.turned(assigned)
        watchdog.check()


def setup(answer: bool | None) -> tuple[FakeClock, Liveness, Input, UnassignedWatch, StuckWatchdog, list[float]]:
    clock = FakeClock()
    liveness = Liveness("labeler", clock, stall_seconds=5)
    probe = Input(answer)
    watch = UnassignedWatch(liveness, clock, probe)
    fired: list[float] = []
    watchdog = StuckWatchdog(liveness, STUCK_EXIT_SECONDS, on_stuck=lambda: fired.append(liveness.stuck_seconds()))
    return clock, liveness, probe, watch, watchdog, fired


def test_without_partitions_while_input_waits_it_warns_after_10_s_and_exits_after_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, liveness, probe, watch, watchdog, fired = setup(True)
    turn_for(5, clock, watch, watchdog, assigned=True)
    assert liveness.stuck_seconds() == 0.0
    with caplog.at_level(logging.WARNING, logger="quotewatch.core.runtime.session"):
        turn_for(int(UNASSIGNED_WARN_SECONDS) - 1, clock, watch, watchdog, assigned=False)
        assert not watch.warned
        assert not caplog.records
        turn_for(1, clock, watch, watchdog, assigned=False)
        assert watch.warned
        assert len(caplog.records) == 1
        assert "no partition assigned for 10 s while the input has data" in caplog.records[0].getMessage()
        turn_for(30, clock, watch, watchdog, assigned=False)
        assert len(caplog.records) == 1, "warned once, not every turn"
    assert fired == []
    turn_for(STUCK_EXIT_SECONDS - 40 + 1, clock, watch, watchdog, assigned=False)
    assert fired == [STUCK_EXIT_SECONDS + 1], "the turns kept coming, yet the watchdog ended the process"
    assert probe.asked >= 2, "the input is asked again while unassigned"


def test_partitions_assigned_again_in_time_count_as_life_again() -> None:
    clock, liveness, _, watch, watchdog, fired = setup(True)
    turn_for(STUCK_EXIT_SECONDS - 5, clock, watch, watchdog, assigned=False)
    assert liveness.stuck_seconds() == STUCK_EXIT_SECONDS - 5
    turn_for(1, clock, watch, watchdog, assigned=True)  # the group rebalanced in time
    assert liveness.stuck_seconds() == 0.0
    assert not watch.warned
    turn_for(STUCK_EXIT_SECONDS - 5, clock, watch, watchdog, assigned=False)
    assert fired == []


def test_without_partitions_and_nothing_waiting_the_loop_is_alive() -> None:
    """A spare replica or an idle input: nothing to read, so holding no partition is not stuck."""
    clock, liveness, probe, watch, watchdog, fired = setup(False)
    turn_for(10 * STUCK_EXIT_SECONDS, clock, watch, watchdog, assigned=False)
    assert fired == []
    assert liveness.stuck_seconds() == 0.0
    # The probe is a broker request: asked once per INPUT_PROBE_SECONDS, not once per turn.
    assert probe.asked == pytest.approx(10 * STUCK_EXIT_SECONDS / INPUT_PROBE_SECONDS, abs=1)


def test_input_arriving_later_starts_the_count_and_a_silent_broker_keeps_the_last_answer() -> None:
    clock, _, probe, watch, watchdog, fired = setup(False)
    turn_for(30, clock, watch, watchdog, assigned=False)
    probe.answer = True  # records arrive; the group still holds nothing
    turn_for(int(INPUT_PROBE_SECONDS), clock, watch, watchdog, assigned=False)
    probe.answer = None  # the broker goes away: the last answer (data waiting) stands
    turn_for(STUCK_EXIT_SECONDS + 2, clock, watch, watchdog, assigned=False)
    assert len(fired) == 1


def test_an_unknown_input_at_start_is_taken_as_waiting() -> None:
    """The broker never answered (an outage from the start): like the lake sink's old rule, restart."""
    clock, _, _, watch, watchdog, fired = setup(None)
    turn_for(STUCK_EXIT_SECONDS + 2, clock, watch, watchdog, assigned=False)
    assert len(fired) == 1
