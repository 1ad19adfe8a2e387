"""Alembic environment: runs on the connection `migrate` hands over, inside its lock."""

from __future__ import annotations

from alembic import context

from processor.storage.table import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
