"""The connection state machine of the ingest (pure: no I/O; time and randomness injected).

::

    INIT ──connect──▶ CONNECTING ──subscribed──▶ SUBSCRIBED
                          │                          │ close / silence / resync
                     error/timeout                   ▼
                          ▼                     RECONNECTING ──subscribed──▶ SUBSCRIBED
                       BACKOFF ◀──error/timeout──────┘
                          │ after a delay (exponential, full jitter)
                          └──────────▶ CONNECTING
    stop() from any state ──▶ STOPPED

- The delay before attempt ``n`` (n = consecutive failures) is uniform in
  ``[0, min(max, initial * 2**(n-1))]`` ("full jitter").
- Failures are forgotten once a connection has stayed SUBSCRIBED for ``reset_seconds``.
- A connection lost before that counts as a failure too; RECONNECTING then goes straight to
  BACKOFF instead of reconnecting at once (a flapping server is not hammered).
- A lost connection reconnects after a delay uniform in ``[0, reconnect_jitter]`` (the RECONNECTING
  transition's ``delay_seconds``): when the exchange restarts, every client's connection drops at
  once, and clients that all reconnect at once are a thundering herd.

Who drives it: :class:`quotewatch.services.ingest.service.IngestService`, from its event loop; each
transition is reported to ``on_transition`` (logs, metrics, control records).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

_MAX_DOUBLINGS = 60
"""2**60 times any initial backoff is far past any cap, and still a finite float."""


class FeedState(StrEnum):
    INIT = "INIT"
    CONNECTING = "CONNECTING"
    SUBSCRIBED = "SUBSCRIBED"
    RECONNECTING = "RECONNECTING"
    BACKOFF = "BACKOFF"
    STOPPED = "STOPPED"


class IllegalTransitionError(RuntimeError):
    """A transition the diagram does not have (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class Transition:
    previous: FeedState
    state: FeedState
    reason: str
    at_ns: int
    """Monotonic time of the transition."""
    delay_seconds: float = 0.0
    """For BACKOFF and RECONNECTING: how long before the next attempt."""


_ALLOWED: dict[FeedState, frozenset[FeedState]] = {
    FeedState.INIT: frozenset({FeedState.CONNECTING}),
    FeedState.CONNECTING: frozenset({FeedState.SUBSCRIBED, FeedState.BACKOFF}),
    FeedState.SUBSCRIBED: frozenset({FeedState.RECONNECTING}),
    FeedState.RECONNECTING: frozenset({FeedState.SUBSCRIBED, FeedState.BACKOFF}),
    FeedState.BACKOFF: frozenset({FeedState.CONNECTING}),
    FeedState.STOPPED: frozenset(),
}


class ConnectionStateMachine:
    """States, transitions and the backoff schedule of one feed connection."""

    def __init__(
        self,
        *,
        backoff_initial_seconds: float,
        backoff_max_seconds: float,
        backoff_reset_seconds: float,
        monotonic_ns: Callable[[], int],
        rng: random.Random | None = None,
        on_transition: Callable[[Transition], None] | None = None,
        reconnect_jitter_seconds: float = 0.0,
    ) -> None:
        self._initial = backoff_initial_seconds
        self._jitter = reconnect_jitter_seconds
        self._max = backoff_max_seconds
        self._reset_ns = int(backoff_reset_seconds * 1e9)
        self._now = monotonic_ns
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._on_transition = on_transition
        self.state = FeedState.INIT
        self.failures = 0
        """Consecutive failed or short-lived connections (drives the backoff)."""
        self._subscribed_at: int | None = None
        self.history: list[Transition] = []

    def _go(self, state: FeedState, reason: str, delay: float = 0.0) -> Transition:
        if state is not FeedState.STOPPED and state not in _ALLOWED[self.state]:
            raise IllegalTransitionError(f"{self.state} -> {state} ({reason})")
        transition = Transition(self.state, state, reason, self._now(), delay)
        self.state = state
        self.history.append(transition)
        if len(self.history) > 1000:
            del self.history[:500]
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def backoff_delay(self) -> float:
        """The full-jitter delay for the current failure count."""
        # The exponent is bounded: after ~1,000 failures in a row (hours of a down exchange) an
        # unbounded 2**n no longer converts to a float (OverflowError) and the ingest would die.
        doublings = min(max(0, self.failures - 1), _MAX_DOUBLINGS)
        cap = min(self._max, self._initial * 2.0**doublings)
        return self._rng.uniform(0.0, cap)

    # -- events -------------------------------------------------------------------------------

    def connect(self, reason: str = "connecting") -> Transition | None:
        """An attempt starts: INIT/BACKOFF -> CONNECTING (RECONNECTING stays RECONNECTING)."""
        if self.state is FeedState.RECONNECTING:
            return None
        return self._go(FeedState.CONNECTING, reason)

    def subscribed(self, reason: str = "subscribed") -> Transition:
        """Subscriptions confirmed: CONNECTING/RECONNECTING -> SUBSCRIBED."""
        self._subscribed_at = self._now()
        return self._go(FeedState.SUBSCRIBED, reason)

    def failed(self, reason: str) -> Transition:
        """Connect or subscribe failed (error, timeout): -> BACKOFF with the next delay."""
        self.failures += 1
        return self._go(FeedState.BACKOFF, reason, self.backoff_delay())

    def lost(self, reason: str) -> Transition:
        """A subscribed connection ended (close, silence, resync): SUBSCRIBED -> RECONNECTING.

        A connection that was stable for ``reset_seconds`` clears the failure count; a shorter
        one counts as a failure, and after two of those in a row :meth:`should_back_off` says so.
        The transition's ``delay_seconds`` is the jittered wait before reconnecting.
        """
        stable = self._subscribed_at is not None and self._now() - self._subscribed_at >= self._reset_ns
        self.failures = 0 if stable else self.failures + 1
        self._subscribed_at = None
        delay = self._rng.uniform(0.0, self._jitter) if self._jitter > 0 else 0.0
        return self._go(FeedState.RECONNECTING, reason, delay)

    def should_back_off(self) -> bool:
        """In RECONNECTING: True when connections keep dying young (go to BACKOFF, don't reconnect at once)."""
        return self.state is FeedState.RECONNECTING and self.failures >= 2

    def back_off(self, reason: str) -> Transition:
        """RECONNECTING -> BACKOFF without a new failure (the flapping case)."""
        return self._go(FeedState.BACKOFF, reason, self.backoff_delay())

    def stop(self, reason: str = "stop requested") -> Transition | None:
        """From any state -> STOPPED (idempotent)."""
        if self.state is FeedState.STOPPED:
            return None
        return self._go(FeedState.STOPPED, reason)
