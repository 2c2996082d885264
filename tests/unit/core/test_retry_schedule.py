"""retry_schedule: the bounded retry shared by await_topics_visible and query_watermarks."""

from __future__ import annotations

import itertools

from quotewatch.core.kafka import retry_schedule


def test_pauses_double_up_to_one_second_between_attempts() -> None:
    pauses: list[float] = []
    attempts = list(itertools.islice(retry_schedule(60, 0.05, pauses.append), 9))
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]  # no pause after the last attempt taken
    assert all(0.1 <= left <= 60 for left in attempts)
    assert attempts == sorted(attempts, reverse=True)  # the time left only shrinks


def test_it_stops_when_the_next_pause_would_pass_the_deadline() -> None:
    pauses: list[float] = []
    attempts = list(retry_schedule(0.5, 0.2, pauses.append))
    # The fake wait takes no time, so each pause is weighed against the whole 0.5 s: 0.2 and 0.4
    # fit before the deadline, 0.8 would pass it.
    assert pauses == [0.2, 0.4]
    assert len(attempts) == 3
    assert attempts[-1] >= 0.1  # an attempt always gets some time


def test_a_wait_that_answers_true_stops_the_retries() -> None:
    attempts = list(retry_schedule(60, 0.05, lambda _: True))
    assert len(attempts) == 1


def test_transient_backoff_doubles_from_half_a_second_to_ten_and_resets() -> None:
    from quotewatch.core.kafka import ShutdownSignal, TransientBackoff

    backoff = TransientBackoff()
    assert [backoff.next_pause() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    stopping = ShutdownSignal()
    stopping.set()
    backoff.wait(stopping)  # a requested shutdown is not held up by the pause
    backoff.reset()
    assert backoff.next_pause() == 0.5
