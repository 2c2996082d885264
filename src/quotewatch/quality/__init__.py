"""The model-quality report (``quotewatch quality``, ``make quality``): real captures and the synthetic market.

It composes two services' pure code (the backtest engine of ``services/replay`` and the trainer's
functions of ``services/trainer``), which no service may import from another, so it sits above the
services, below the CLI.
"""
