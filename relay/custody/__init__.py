"""Custody: the durable spool (SQLite in WAL, group commit, body files), its
history, the disk reserve, damage verdicts and recovery.

The only package that imports ``sqlite3``; the only owner of the schema.
Everything else reads the spool through its queries.
"""
