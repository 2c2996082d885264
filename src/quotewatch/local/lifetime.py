"""Children that end with the process that started them (Linux ``PR_SET_PDEATHSIG``).

Who uses this: :mod:`quotewatch.local.processes` for every child of ``quotewatch demo``, and
:class:`~quotewatch.local.kafka.LocalKafka` for the broker when the stack starts it. A broker
started by ``quotewatch broker start`` must outlive that command, so it does not use it.

The kernel sends the signal when the *thread* that forked the child exits, not the process: the
stack forks every child from its main thread, which lives as long as the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Loaded in the parent: the preexec hook runs between fork and exec, where little is safe to do.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``signum`` when this process dies.

    SIGTERM by default: every QuoteWatch service flushes and closes on it, and Kafka shuts down
    cleanly (a controlled shutdown, its logs flushed). Should the parent die between the fork and
    the ``prctl`` call, the child would never be told, so it checks that its parent is still the
    one that forked it and, if not, signals itself at once.
    """
    parent = os.getpid()

    def preexec() -> None:  # pragma: no cover - runs in the forked child before exec
        if _LIBC is None:
            return
        _LIBC.prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec
