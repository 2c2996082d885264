"""ML: model scoring, evaluation metrics, live metrics, and the MLflow registry adapter.

Everything here but :mod:`registry` is pure. ``registry`` is the one module that talks to MLflow
(loading and logging models); it sits next to the code whose models it stores.
"""
