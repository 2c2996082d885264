"""Prometheus metrics every service exports (names, help and labels in one place).

Services increment these; :mod:`quotewatch.core.health` serves them on ``/metrics``. Names follow
Prometheus conventions (``_total`` counters, base units in the name).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

RECORDS_IN = Counter(
    "quotewatch_records_in_total", "Records consumed (decoded or dead-lettered).", ["service", "topic"]
)
RECORDS_OUT = Counter("quotewatch_records_out_total", "Records produced.", ["service", "topic"])
DEAD_LETTERS = Counter(
    "quotewatch_dead_letters_total",
    "Records or frames sent to the dead-letter topic.",
    ["service", "source_topic", "error_type"],
)
CONSUMER_LAG = Gauge(
    "quotewatch_consumer_lag_records",
    "High watermark minus position, per input partition.",
    ["service", "topic", "partition"],
)
PROCESSING_SECONDS = Histogram(
    "quotewatch_processing_seconds",
    "Time to process one consumed batch, from consume to commit.",
    ["service"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TRANSACTIONS = Counter(
    "quotewatch_transactions_total",
    "Kafka transactions by outcome (committed, aborted).",
    ["service", "outcome"],
)
LAST_PROGRESS = Gauge(
    "quotewatch_last_progress_timestamp_seconds", "Unix time of the last processed record.", ["service"]
)
HEALTHY = Gauge("quotewatch_healthy", "1 when processing is advancing (see /health), else 0.", ["service"])
GAPS = Counter(
    "quotewatch_gaps_total",
    "Gap/reset events emitted, by symbol and reason.",
    ["service", "symbol", "reason"],
)
RECONNECTS = Counter("quotewatch_reconnects_total", "WebSocket reconnects.", ["service"])
FEED_STATE = Gauge(
    "quotewatch_feed_state",
    "Ingest connections in each state of the connection state machine (1/0 with one connection).",
    ["service", "state"],
)
CONTROL_FRAME_ANOMALIES = Counter(
    "quotewatch_control_frame_anomalies_total",
    "Odd control frames (subscription acks, heartbeats) used anyway, by message type and anomaly "
    "(invalid_field, unknown_field, unusable); details in the log.",
    ["service", "feed", "message_type", "anomaly"],
)
FEED_ERRORS = Counter(
    "quotewatch_feed_errors_total",
    "Error messages sent by the exchange (a refused subscribe or key); the text is in the log and the DLQ.",
    ["service", "feed"],
)
MODEL_VERSION = Gauge(
    "quotewatch_model_version",
    "Registry version of the model being served, per role.",
    ["service", "role", "model_name"],
)
CHAMPION_LIVE_LIFT = Gauge(
    "quotewatch_champion_live_lift",
    "Champion's live AUC minus the rolling change frequency baseline's, on the live-metrics window: the point "
    "estimate and the 95 % block-bootstrap bounds (NaN when undefined).",
    ["service", "statistic"],
)
CHAMPION_LIFT_BELOW_ZERO = Gauge(
    "quotewatch_champion_lift_below_zero",
    "1 when the champion's live lift has been below zero for LIFT_ALARM_MS of label event time, else 0.",
    ["service"],
)
MODEL_RELOADS = Counter(
    "quotewatch_model_reloads_total",
    "Model reload attempts by outcome (success, failure).",
    ["service", "outcome"],
)
LAKE_ROWS_WRITTEN = Counter(
    "quotewatch_lake_rows_written_total", "Rows written to Parquet lake files, per topic.", ["service", "topic"]
)
LAKE_FILES_WRITTEN = Counter(
    "quotewatch_lake_files_written_total", "Parquet lake files published, per topic.", ["service", "topic"]
)
LAKE_BYTES_WRITTEN = Counter(
    "quotewatch_lake_bytes_written_total", "Bytes of Parquet lake files published, per topic.", ["service", "topic"]
)
BUILD_INFO = Info("quotewatch_build", "QuoteWatch version and service.")
