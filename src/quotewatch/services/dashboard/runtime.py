"""Per-process live state of the dashboard, built lazily on first use.

Importing the dashboard, building the Dash app or forking starts nothing. The first request a
process serves (a page poll or ``/health``) builds that process's :class:`DashboardRuntime`:
its store and its own consumer thread reading the snapshot topic from the beginning. So:

- under the debug reloader, the watcher process never reads Kafka, only the serving child does;
- under a pre-forking server (``gunicorn -w N``), each worker builds its own state; and if a
  runtime was built before a fork (``--preload`` plus a request), the child sees that the PID
  changed and builds a fresh one instead of using the parent's client, whose threads do not
  exist in the child.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quotewatch.core.clock import Clock, SystemClock
from quotewatch.core.config import DashboardSettings
from quotewatch.core.health import HealthStatus, Liveness
from quotewatch.core.serde import AvroSerde, serde_from_settings
from quotewatch.core.topics import TopicNames
from quotewatch.services.dashboard.consumer import SERVICE, SnapshotConsumer
from quotewatch.services.dashboard.probe import UpstreamProbe
from quotewatch.services.dashboard.store import SnapshotStore
from quotewatch.services.dashboard.view import FeedView
from quotewatch.services.dashboard.waiting import waiting_reasons

logger = logging.getLogger(__name__)

# Runtimes built by a parent process before a fork. The child never uses them and must not
# destroy them either (destroying a Kafka client whose threads only exist in the parent can
# hang), so they stay referenced here.
_ABANDONED_AFTER_FORK: list[Any] = []


@dataclass
class DashboardRuntime:
    """The store, the consumer feeding it and the liveness of that consumer, for one process.

    ``probe`` looks at the pipeline's topics while there is no snapshot, to say why
    (:mod:`quotewatch.services.dashboard.probe`).
    """

    settings: DashboardSettings
    store: SnapshotStore
    consumer: SnapshotConsumer
    liveness: Liveness
    pid: int
    probe: UpstreamProbe

    @classmethod
    def build(
        cls,
        settings: DashboardSettings,
        *,
        clock: Clock | None = None,
        serde: AvroSerde | None = None,
        liveness: Liveness | None = None,
    ) -> DashboardRuntime:
        """A runtime for this process (not started)."""
        clock = clock or SystemClock()
        if serde is None:
            auth = settings.schema_registry_basic_auth_user_info
            serde = serde_from_settings(settings.schema_registry_url, auth.get_secret_value() if auth else None)
        liveness = liveness or Liveness(SERVICE, clock, settings.health_stall_seconds)
        store = SnapshotStore(clock, settings.dash_history_seconds)
        topic = TopicNames(settings.topic_prefix).snapshot
        consumer = SnapshotConsumer(settings, topic, store, serde, clock, liveness)

        def has_snapshots() -> bool:
            return bool(store.symbols())

        def waiting() -> bool:
            return consumer.caught_up() and not has_snapshots()

        probe = UpstreamProbe(settings, serde, clock, needed=waiting, finished=has_snapshots)
        return cls(settings, store, consumer, liveness, os.getpid(), probe)

    def start(self) -> DashboardRuntime:
        self.consumer.start()
        self.probe.start()
        logger.info("dashboard state built", extra={"pid": self.pid, "topic": self.consumer.topic})
        return self

    def stop(self) -> None:
        self.probe.stop()
        self.consumer.stop()

    def feed(self) -> FeedView:
        records, rejected = self.store.counts()
        waiting = tuple(waiting_reasons(self.probe.view())) if not self.store.symbols() else ()
        return FeedView(self.consumer.topic, records, rejected, self.consumer.lag(), self.consumer.caught_up(), waiting)

    def health(self) -> HealthStatus:
        """Liveness of the consumer (progress, not PID), with what this process has read."""
        status = self.liveness.status()
        records, rejected = self.store.counts()
        detail = {
            **status.detail,
            "pid": self.pid,
            "topic": self.consumer.topic,
            "symbols": self.store.symbols(),
            "snapshots_read": records,
            "rejected": rejected,
            "caught_up": self.consumer.caught_up(),
            "seconds_since_last_snapshot": self.store.seconds_since_last_snapshot(),
        }
        if not detail["symbols"]:
            detail["waiting_for"] = waiting_reasons(self.probe.view())
        return HealthStatus(status.healthy, status.reason, detail)


class LazyRuntime:
    """Builds and starts a :class:`DashboardRuntime` on first :meth:`get` in each process.

    Args:
        factory: builds a (not yet started) runtime; called at most once per process.
        getpid: the process id source (tests inject one to simulate a fork).
    """

    def __init__(self, factory: Callable[[], DashboardRuntime], getpid: Callable[[], int] = os.getpid) -> None:
        self._factory = factory
        self._getpid = getpid
        self._lock = threading.Lock()
        self._runtime: DashboardRuntime | None = None
        self._pid: int | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by another thread at the fork; that thread is gone.
        self._lock = threading.Lock()

    def get(self) -> DashboardRuntime:
        """This process's runtime, built and started on first use."""
        pid = self._getpid()
        runtime = self._runtime
        if runtime is not None and self._pid == pid:
            return runtime
        with self._lock:
            if self._runtime is None or self._pid != pid:
                if self._runtime is not None:
                    logger.info("new process: building its own dashboard state", extra={"pid": pid})
                    _ABANDONED_AFTER_FORK.append(self._runtime)
                self._runtime = self._factory().start()
                self._pid = pid
            return self._runtime

    @property
    def built(self) -> bool:
        """True when this process has built its runtime."""
        return self._runtime is not None and self._pid == self._getpid()

    def stop(self) -> None:
        """Stop this process's consumer (if it was built here).

        The stopped runtime stays in place: late requests read its last state (and ``/health``
        reports the stopped consumer) instead of building a new consumer.
        """
        with self._lock:
            if self._runtime is not None and self._pid == self._getpid():
                self._runtime.stop()
