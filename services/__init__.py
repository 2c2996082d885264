"""QuoteWatch: real-time market-microstructure ML on the Coinbase level-2 order book.

The import package ``quotewatch`` is this ``services/`` folder:

- ``core``: the contracts every service shares (config, Avro schemas and serde, topic catalog,
  Kafka helpers, clock, logging, metrics, health).
- ``domain``: pure functions over plain records (Coinbase parsing, the order book, features,
  labels, scoring). No I/O, no clock, no Kafka: the live services and the batch backtest call
  the same code.
- one folder per service (ingest, feed_server, book, labeler, inference, lake_sink, trainer,
  replay, dashboard); services meet only on topics.
- ``local``: runs the real infrastructure on a machine without Docker (Kafka in KRaft mode,
  an MLflow server, the whole stack).
"""

__version__ = "0.1.0"
