"""The one consumer runtime every stream service runs in.

- :mod:`~quotewatch.core.runtime.session`: the group consumer (assignment, revoke, committed
  offsets, lag, backoff) and the liveness rule for a loop turn without partitions.
- :mod:`~quotewatch.core.runtime.processor`: the transactional per-batch consume-transform-produce
  loop of a :class:`~quotewatch.core.runtime.task.StreamTask` (book, labeler, inference, ingest's
  topic mode).
- :mod:`~quotewatch.core.runtime.sink`: commit-after-write sink mode with ``write``/``flush`` hooks
  (the lake sink).
- :mod:`~quotewatch.core.runtime.deadletter`: the one mapper from a rejection to a dead letter.

Errors mean one thing everywhere (:mod:`quotewatch.core.errors`): poison input is dead-lettered
and the loop goes on; a ``RetriableError`` rewinds and retries with backoff; a ``FatalError`` ends
the process with a non-zero exit, and its supervisor restarts it.
"""

from quotewatch.core.runtime.deadletter import Rejection, dead_letter
from quotewatch.core.runtime.processor import StreamProcessor, restart_offset_from_metadata
from quotewatch.core.runtime.session import ConsumerSession, UnassignedWatch
from quotewatch.core.runtime.sink import SinkRunner, SinkWriter
from quotewatch.core.runtime.task import InRecord, OutRecord, StreamTask, V

__all__ = [
    "ConsumerSession",
    "InRecord",
    "OutRecord",
    "Rejection",
    "SinkRunner",
    "SinkWriter",
    "StreamProcessor",
    "StreamTask",
    "UnassignedWatch",
    "V",
    "dead_letter",
    "restart_offset_from_metadata",
]
