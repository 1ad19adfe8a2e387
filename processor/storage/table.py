"""The `services` table: one row per unique `(ip, port, service)`, a contract other tools read."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every dialect (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# Responses are compared byte-wise ("C" collation on PostgreSQL, SQLite's BINARY): the same
# order as Python's str comparison, so the in-batch merge and the database agree on ties.
ResponseText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


class Base(DeclarativeBase):
    pass


class Service(Base):
    """One row per unique `(ip, port, service)`: a contract other tools read."""

    __tablename__ = "services"
    # Room on each heap page for updated rows (migration 0002).
    __table_args__ = {"postgresql_with": {"fillfactor": 90}}

    ip: Mapped[str] = mapped_column(sa.String(45), primary_key=True)
    port: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    service: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    last_scanned: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    response: Mapped[str] = mapped_column(ResponseText)
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
