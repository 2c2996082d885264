"""The error types of QuoteWatch.

Three kinds of error are handled differently (see CONVENTIONS.md):

- fatal (:class:`FatalError`, :class:`ConfigError`): re-raised, the process exits non-zero;
- retriable (:class:`RetriableError`): backed off with jitter and retried;
- poison record (:class:`PoisonRecordError` and the serde errors): dead-lettered with its
  coordinates, and the service carries on.

Third-party errors are wrapped at the boundary with ``raise OurError(...) from exc``.
"""

from __future__ import annotations


class QuoteWatchError(Exception):
    """Base class of every error QuoteWatch raises on purpose."""


class FatalError(QuoteWatchError):
    """The process cannot go on (bad configuration, fenced producer, lost broker for good)."""


class ConfigError(FatalError):
    """The configuration is invalid; the message says which setting and why."""


class RetriableError(QuoteWatchError):
    """A transient failure: back off and try again."""


class SchemaRegistryUnavailableError(RetriableError):
    """The schema registry did not answer (connection error, 5xx, timeout): not the record's fault.

    A record whose schema cannot be fetched right now is not poison: processing stops without
    committing it (the service restarts and reads it again) instead of dead-lettering it.
    """


class PoisonRecordError(QuoteWatchError):
    """One input record cannot be processed; it goes to the dead-letter topic, the rest carry on."""


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
