"""The error types of QuoteWatch.

Errors mean one thing everywhere. The consumer runtime (:mod:`quotewatch.core.runtime`: the
stream processor and the lake sink's sink mode) and the ingest handle them so:

- **poison input** (:class:`PoisonRecordError`, the serde errors, and any other exception a task
  raises on one record): the record goes to the dead-letter topic with its original bytes and
  coordinates (topic, partition, offset, reason), and the service goes on with the next record;
- **retriable** (:class:`RetriableError`): not the record's fault; the batch is rewound to the
  last commit (its open transaction aborted) and retried after a backoff (doubling, with jitter,
  reset after a success); nothing is dead-lettered or skipped;
- **fatal** (:class:`FatalError`, :class:`ConfigError`): re-raised out of the loop, never
  dead-lettered; the process exits non-zero (``quotewatch run`` prints one line and exits 1) and
  its supervisor restarts it. An open transaction is never committed.

Third-party errors are wrapped at the boundary with ``raise OurError(...) from exc``.
"""

from __future__ import annotations


class QuoteWatchError(Exception):
    """Base class of every error QuoteWatch raises on purpose."""


class FatalError(QuoteWatchError):
    """The process cannot go on (bad configuration, fenced producer, lost broker for good).

    Raised anywhere, including by a task on one record, it ends the service with a non-zero exit
    (its supervisor restarts it); it is never dead-lettered.
    """


class ConfigError(FatalError):
    """The configuration is invalid; the message says which setting and why."""


class RetriableError(QuoteWatchError):
    """A transient failure, not the record's fault: the runtime rewinds to the last commit and
    retries after a backoff (doubling, with jitter); the record is neither dead-lettered nor skipped."""


class SchemaRegistryUnavailableError(RetriableError):
    """The schema registry did not answer (connection error, 5xx, timeout): not the record's fault.

    A record whose schema cannot be fetched right now is not poison: processing stops without
    committing it (the service restarts and reads it again) instead of dead-lettering it.
    """


class PoisonRecordError(QuoteWatchError):
    """One input record cannot be processed: it goes to the dead-letter topic with its bytes and
    coordinates, and the service goes on with the next record."""


class SerdeError(PoisonRecordError):
    """Bytes could not be encoded or decoded with the Avro contracts."""


class DecodeError(SerdeError):
    """The bytes are not a valid record of a known schema (garbage, truncated, wrong framing)."""


class RecordLimitError(DecodeError):
    """A record is larger than its schema's limits allow once decoded (array items, string length).

    Checked by the serde before (items) or right after (strings) decoding, so a crafted record of
    a few MB cannot decode into GBs (:mod:`quotewatch.core.limits`); dead-lettered like garbage.
    """


class UnknownSchemaError(SerdeError):
    """The writer schema named by the bytes (fingerprint or registry id) is not known here."""


class EncodeError(SerdeError):
    """A record does not match the schema it is being written with."""


class UntrustedInputError(QuoteWatchError, ValueError):
    """Text or bytes we did not write (a record's payload, offset metadata, a file footer, a request
    body, a model artifact) is not what it must be: too large, nested too deeply, not valid, or with
    fields of the wrong type or range. Raised by the bounded parsers (:mod:`quotewatch.core.bounded`);
    each caller decides what it means there (a dead letter, a value ignored, a request refused).

    Also a :class:`ValueError`, so code that handled a malformed value before still does.
    """


class BrokerError(QuoteWatchError):
    """The local broker could not be installed, started, reached or stopped."""
