"""The labeler service."""
