"""The spend ledger: one PostgreSQL row per AI call, written from the usage events on JetStream.

Modules: ``schema`` (the tables, their migrations, event → row), ``consumer`` (``Ledger``: the durable
JetStream consumer that writes the rows). Behind ``extproc ledger`` (extproc/cli/ledger.py).
"""
