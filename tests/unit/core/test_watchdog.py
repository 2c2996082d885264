"""The stuck watchdog: a loop that stops turning ends the process, so its supervisor restarts it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from quotewatch.core.clock import FakeClock
from quotewatch.core.health import EXIT_STUCK, Liveness, StuckWatchdog

SECOND = 1_000_000_000


def test_fires_once_when_the_loop_has_not_turned_for_the_limit() -> None:
    clock = FakeClock()
    liveness = Liveness("book", clock, stall_seconds=5)
    fired: list[float] = []
    watchdog = StuckWatchdog(liveness, 20, on_stuck=lambda: fired.append(liveness.stuck_seconds()))
    clock.advance(19 * SECOND)
    assert not watchdog.check()
    liveness.beat()  # the loop turned: the count starts again
    clock.advance(19 * SECOND)
    assert not watchdog.check()
    clock.advance(1 * SECOND)
    assert not watchdog.check()  # seen once: suspected, not yet confirmed
    clock.advance(1 * SECOND)
    assert watchdog.check()
    assert fired == [21.0]
    clock.advance(60 * SECOND)
    assert not watchdog.check()  # once is enough: the process is on its way out
    assert fired == [21.0]


def test_a_loop_that_turns_right_after_a_stale_check_is_not_ended() -> None:
    """A resumed process: the first check finds a stale beat, the loop turns before the second."""
    clock = FakeClock()
    liveness = Liveness("inference", clock, stall_seconds=5)
    fired: list[bool] = []
    watchdog = StuckWatchdog(liveness, 10, on_stuck=lambda: fired.append(True))
    clock.advance(300 * SECOND)
    assert not watchdog.check()
    liveness.beat()
    clock.advance(1 * SECOND)
    assert not watchdog.check()
    clock.advance(10 * SECOND)
    assert not watchdog.check()
    assert fired == []


def test_progress_counts_as_a_turn_and_a_stopped_loop_is_not_stuck() -> None:
    clock = FakeClock()
    liveness = Liveness("labeler", clock, stall_seconds=5)
    fired: list[bool] = []
    watchdog = StuckWatchdog(liveness, 10, on_stuck=lambda: fired.append(True))
    clock.advance(9 * SECOND)
    liveness.progressed(3)
    clock.advance(9 * SECOND)
    assert not watchdog.check()
    liveness.stopped("shutdown requested")  # shutting down (flushing, closing) is not stuck
    clock.advance(600 * SECOND)
    assert liveness.stuck_seconds() == 0.0
    assert not watchdog.check()
    assert fired == []


def test_a_limit_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        StuckWatchdog(Liveness("x", FakeClock(), 5), 0)


def test_a_service_whose_loop_hangs_exits_with_status_70() -> None:
    """A real process: service_context with STUCK_EXIT_SECONDS=1 and a loop that beats once, then hangs."""
    script = textwrap.dedent(
        """
        import threading
        from quotewatch.core.config import CommonSettings
        from quotewatch.core.service import service_context

        settings = CommonSettings(stuck_exit_seconds=1, metrics_port=0)
        with service_context("book", settings, create_topics=False, install_signals=False) as context:
            context.liveness.beat()
            threading.Event().wait(60)  # the hang: never set
        raise SystemExit("the watchdog did not end the process")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == EXIT_STUCK, done.stderr
    assert "processing loop stuck" in done.stderr
    assert "STUCK_EXIT_SECONDS=1" in done.stderr
