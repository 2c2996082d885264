"""Benchmarks (``make bench``): not collected by pytest; run by ``python -m tests.benchmarks``."""
