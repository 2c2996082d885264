"""Simulation: the synthetic Coinbase market (deterministic from a seed) used by the feed server,
the benchmarks and the tests."""
