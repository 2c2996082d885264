"""Venue parsing: Coinbase frames (Exchange ``level2`` and Advanced Trade ``l2_data``) to MarketEvents.

The parsers, the normaliser that turns the raw log into ``md.events`` deterministically, and the
capture files of recorded sessions. Pure: no I/O but reading a capture file on request.
"""
