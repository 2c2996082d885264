"""One folder per service; each has a small entry point and imports no other service.

Services meet only on topics (``quotewatch.core.topics``). The long-running stream services are
ingest, book, labeler, inference and lake_sink; feed_server, trainer, replay and dashboard are the
tools around them.
"""
