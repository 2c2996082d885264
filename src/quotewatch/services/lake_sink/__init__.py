"""The lake_sink service."""
