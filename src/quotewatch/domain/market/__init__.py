"""Market state: the order book, the event-time grid, top-of-book features and labels.

Pure functions and state machines over records; the book service and the backtest call the same
code (that is what makes replay parity hold byte for byte).
"""
