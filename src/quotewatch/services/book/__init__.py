"""The book service."""
