"""Pure domain logic: functions over plain records, shared by the live services and the backtest.

Nothing in this package performs I/O, reads a clock or talks to Kafka.
"""
