"""The feed_server service."""
