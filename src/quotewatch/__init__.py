"""QuoteWatch: real-time market-microstructure ML on the Coinbase level-2 order book.

The layers, each importing only the ones above it in this list:

- ``core``: the contracts every service shares (config, Avro schemas and serde, topic catalog,
  Kafka helpers, clock, logging, metrics, health).
- ``domain``: pure functions over records, by topic: ``venue`` (Coinbase parsing and
  normalising), ``market`` (order book, features, labels), ``ml`` (scoring, evaluation, the
  MLflow registry adapter), ``simulation`` (the synthetic market). No Kafka, no clock: the live
  services and the batch backtest call the same code.
- ``services``: one folder per service (ingest, feed_server, book, labeler, inference,
  lake_sink, trainer, replay, dashboard); services meet only on topics.
- ``local``: runs the real infrastructure on a machine without Docker (Kafka in KRaft mode,
  an MLflow server, the whole stack).
"""

__version__ = "0.1.0"
