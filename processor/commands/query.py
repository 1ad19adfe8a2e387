"""`mini-scan services` and `mini-scan stats`: read the `services` table.

Read-only, SQLAlchemy Core with bound parameters only. A CIDR filter is narrowed in SQL by the
address text the network's members share (whole IPv4 octets; the `:` of IPv6) and decided in
Python with `ipaddress`, while rows stream in sort order, so `--limit` counts matching rows only.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine

from processor.commands import run_command
from processor.commands.inert import cell, csv_cell
from processor.config import ArgumentParser, DatabaseSettings, add_arguments, load
from processor.errors import ConfigError, QueryError, first_line
from processor.storage import Service, database_url, open_engine

SORT_KEYS = ("ip", "port", "service", "last_scanned", "first_seen")
COLUMNS = ("ip", "port", "service", "last_scanned", "first_seen", "response")
_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_STREAM_ROWS = 1000  # rows fetched per round trip while a CIDR filter discards some
_table = Service.__table__


# --- flag values -------------------------------------------------------------------------------


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip_filter(text: str) -> str | Network:
    """An address (canonical text, as stored) or a network, from `--ip`."""
    try:
        if "/" in text:
            return ipaddress.ip_network(text.strip(), strict=False)
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or CIDR") from None
    # The decoder stores an IPv4-mapped IPv6 address as its IPv4 form: look for that.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`15m`, `2h`, `1d`, `1w` before now, or an ISO 8601 date/time (naive means UTC)."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        seconds = int(relative[1]) * _UNIT_SECONDS[relative[2]]
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        message = f"{text!r} is neither a duration like 15m, 2h, 1d nor an ISO date/time"
        raise argparse.ArgumentTypeError(message) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _sort_key(text: str) -> str:
    if text.removeprefix("-") not in SORT_KEYS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(SORT_KEYS)}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0..65535)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# --- reading -----------------------------------------------------------------------------------


def read_engine(url: str) -> Engine:
    """An engine for reading; refuses to create a SQLite file that is not there."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
            raise QueryError(f"database file {path} does not exist: nothing has been stored yet")
        # Not open_engine(): its BEGIN IMMEDIATE would take the write lock for a mere read.
        return sa.create_engine(parsed, connect_args={"timeout": 30})
    return open_engine(parsed, pool_size=1)


def select_services(
    *,
    ip: str | Network | None = None,
    port: int | None = None,
    service: str | None = None,
    since: dt.datetime | None = None,
    sort: str = "-last_scanned",
) -> sa.Select[Any]:
    """The rows matching the filters in sort order (a CIDR is only narrowed here, see module)."""
    c = _table.c
    query = sa.select(*(c[name] for name in COLUMNS))
    if isinstance(ip, str):
        query = query.where(c.ip == ip)
    elif ip is not None:
        query = query.where(_network_prefilter(ip))
    if port is not None:
        query = query.where(c.port == port)
    if service is not None:
        query = query.where(c.service == service.strip().upper())  # stored upper-case
    if since is not None:
        query = query.where(c.last_scanned >= since)
    column = c[sort.removeprefix("-")]
    primary = column.desc() if sort.startswith("-") else column.asc()
    # The key breaks ties, so equal sort values come out the same way on every dialect.
    return query.order_by(primary, c.ip, c.port, c.service)


def _network_prefilter(network: Network) -> sa.ColumnElement[bool]:
    ip = _table.c.ip
    if network.version == 6:
        return ip.contains(":", autoescape=True)
    octets = network.prefixlen // 8
    prefix = ".".join(str(network.network_address).split(".")[:octets])
    if octets == 4:
        return ip == prefix
    if octets == 0:
        return ~ip.contains(":", autoescape=True)
    return ip.startswith(prefix + ".", autoescape=True)


def fetch_services(
    engine: Engine, query: sa.Select[Any], network: Network | None, limit: int
) -> list[dict[str, Any]]:
    """At most `limit` rows of `query` (those inside `network`, if given), as dicts."""
    rows: list[dict[str, Any]] = []
    with _reading(engine) as connection:
        if network is None:
            result = connection.execute(query.limit(limit))
        else:
            result = connection.execution_options(yield_per=_STREAM_ROWS).execute(query)
        for row in result:
            if network is None or ipaddress.ip_address(row.ip) in network:
                rows.append(dict(row._mapping))
                if len(rows) >= limit:
                    break
        result.close()
    return rows


def service_stats(engine: Engine, now: dt.datetime | None = None) -> dict[str, Any]:
    """Row count, rows per service, the newest and oldest scan, rows changed in the last minute."""
    c = _table.c
    minute_ago = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=1)
    totals = sa.select(
        sa.func.count(),
        sa.func.max(c.last_scanned),
        sa.func.min(c.first_seen),
        sa.func.count().filter(c.updated_at >= minute_ago),
    )
    per_service = sa.select(c.service, sa.func.count()).group_by(c.service).order_by(c.service)
    with _reading(engine) as connection:
        rows, newest, oldest, recent = connection.execute(totals).one()
        services = dict(connection.execute(per_service).all())
    # SQLite's aggregates return the stored text, not a datetime: normalise both dialects.
    return {
        "rows": rows,
        "per_service": services,
        "newest_scan": _as_utc(newest),
        "oldest_scan": _as_utc(oldest),
        "updated_last_minute": recent,
    }


class _reading:
    """A connection whose database errors become one-line `QueryError`s."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: sa.Connection | None = None

    def __enter__(self) -> sa.Connection:
        try:
            self._connection = self._engine.connect()
            present = sa.inspect(self._connection).has_table(_table.name)
        except sa.exc.SQLAlchemyError as exc:
            raise QueryError(f"cannot read the database: {_first_line(exc)}") from None
        if not present:
            self._connection.close()
            raise QueryError(f"table {_table.name} does not exist: run `mini-scan migrate` first")
        return self._connection

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if self._connection is not None:
            self._connection.close()
        if isinstance(error, sa.exc.SQLAlchemyError):
            raise QueryError(f"cannot read the database: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    """The driver's own message where SQLAlchemy wraps one."""
    return first_line(getattr(error, "orig", None) or error)


def _as_utc(value: dt.datetime | str | None) -> dt.datetime | None:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# --- output ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def write_json_lines(rows: Iterable[dict[str, Any]], out: Any) -> None:
    for row in rows:
        out.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")


def write_csv(rows: Sequence[dict[str, Any]], out: Any) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([csv_cell(_plain(row[name])) for name in COLUMNS] for row in rows)


def write_table(rows: Sequence[dict[str, Any]], console: Console) -> None:
    table = Table(*COLUMNS, title=f"{len(rows)} services")
    for row in rows:
        table.add_row(*(_human(row[name]) for name in COLUMNS))
    console.print(table)


def _human(value: Any) -> Text:
    """A stored value as a table cell: inert text (processor/commands/inert.py)."""
    if isinstance(value, dt.datetime):
        return cell(value.strftime("%Y-%m-%d %H:%M:%S"))
    return cell(value)


# --- commands ----------------------------------------------------------------------------------


def _services_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="mini-scan services",
        description="List stored services. --json writes one JSON object per line (JSON lines), "
        "times in ISO 8601 UTC; --csv writes a header row, then one row per service.",
    )
    add = parser.add_argument
    add("--ip", type=parse_ip_filter, help="an address, or a network such as 1.1.1.0/24")
    add("--port", type=_port)
    add("--service", help="service name, any case (HTTP, ssh, ...)")
    add("--since", type=parse_since, help="last scanned since: 15m, 2h, 1d, or an ISO date/time")
    add(
        "--sort",
        type=_sort_key,
        default="-last_scanned",
        help=f"one of {', '.join(SORT_KEYS)}; a leading - sorts descending "
        "(default -last_scanned; ip sorts by its text)",
    )
    add("--limit", type=_positive, default=50, help="at most this many rows (default 50)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    form.add_argument("--csv", action="store_true", help="CSV instead of a table")
    add_arguments(parser, DatabaseSettings)
    return parser


def services_main(argv: Sequence[str] | None = None) -> int:
    """`mini-scan services`: 0 with the rows on stdout; 1 if the database cannot answer."""
    argv = _glue_descending_sort(sys.argv[1:] if argv is None else argv)
    return run_command(_services_parser(), lambda args: _with_database(args, _services), argv)


def _services(engine: Engine, args: argparse.Namespace) -> None:
    network = None if args.ip is None or isinstance(args.ip, str) else args.ip
    query = select_services(
        ip=args.ip, port=args.port, service=args.service, since=args.since, sort=args.sort
    )
    rows = fetch_services(engine, query, network, args.limit)
    if args.json:
        write_json_lines(rows, sys.stdout)
    elif args.csv:
        write_csv(rows, sys.stdout)
    else:
        write_table(rows, Console())


def stats_main(argv: Sequence[str] | None = None) -> int:
    """`mini-scan stats`: 0 with the figures on stdout; 1 if the database cannot answer."""
    parser = ArgumentParser(prog="mini-scan stats", description="Counts of the stored services.")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    add_arguments(parser, DatabaseSettings)
    return run_command(parser, lambda args: _with_database(args, _stats), argv)


def _stats(engine: Engine, args: argparse.Namespace) -> None:
    stats = service_stats(engine)
    if args.json:
        print(json.dumps({k: _plain(v) for k, v in stats.items()}))
        return
    table = Table("figure", "value", title="services")
    for name, value in stats.items():
        if name == "per_service":
            for service, count in value.items():
                table.add_row(cell(f"rows {service}"), str(count))
        else:
            table.add_row(name.replace("_", " "), "-" if value is None else _human(value))
    Console().print(table)


def _glue_descending_sort(argv: Sequence[str]) -> list[str]:
    """`--sort -port` as `--sort=-port`: argparse would take `-port` for an option."""
    glued: list[str] = []
    for arg in argv:
        if glued and glued[-1] == "--sort" and arg.removeprefix("-") in SORT_KEYS:
            glued[-1] = f"--sort={arg}"
        else:
            glued.append(arg)
    return glued


def _with_database(
    args: argparse.Namespace, run: Callable[[Engine, argparse.Namespace], None]
) -> int:
    settings = load(DatabaseSettings, args)
    try:
        engine = read_engine(settings.database_url)
    except sa.exc.ArgumentError as exc:  # a URL SQLAlchemy cannot parse: a setting's error
        raise ConfigError(_first_line(exc)) from None
    try:
        run(engine, args)
    finally:
        engine.dispose()
    return 0
