"""Avro schemas of every QuoteWatch record (package data; loaded by quotewatch.core.schemas).

One ``.avsc`` per record type, named ``<namespace>.<Name>.avsc`` so that fastavro resolves
references between files. ``history/<Name>/vN.avsc`` holds every committed version of each
topic value schema, fully expanded, for the compatibility tests.
"""
