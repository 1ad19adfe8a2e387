"""Leave a tenth of every new heap page of `services` free (PostgreSQL), for HOT updates.

A re-scan rewrites a row without touching its key. When the new version fits on the row's own
page, PostgreSQL writes it there as a heap-only tuple: no new primary-key entry, and one page
dirtied instead of two (each a full-page image in the WAL after a checkpoint). At the default
fillfactor of 100 a loaded page has no room and every update also writes the index
(bench/growth.py: HOT share, WAL bytes per message).

In place and instant: only the storage parameter changes. Pages written from now on keep the
room; pages already full gain it once the table is rewritten (VACUUM FULL or pg_repack), which
this migration does not do because it would lock a large table for minutes. SQLite has no such
setting: nothing to do there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FILLFACTOR = 90  # ~800 bytes per 8 kB page: several new versions of a typical row


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE services SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE services RESET (fillfactor)")
