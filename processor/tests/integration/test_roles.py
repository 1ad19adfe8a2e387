"""Least privilege on PostgreSQL: the roles deploy/postgres/initdb/ makes (the script compose and
the local Kubernetes overlay run), `mini-scan migrate` as the owner, processors as a role that can
only read and write rows, and MIGRATE off: a processor waits for the schema instead of making it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from emulator.testing import IN_CI, wait_until
from processor.storage import Repository, database_url, migrate, open_engine
from processor.tests.helpers import ROOT
from processor.tests.helpers.oracle import expected_rows
from processor.tests.helpers.pipeline import observations, publish_observations, reaches_oracle

ROLES_SCRIPT = ROOT / "deploy" / "postgres" / "initdb" / "10-mini-scan-roles.sh"

pytestmark = pytest.mark.postgres
# Roles and start-up do not depend on the consumer: the default one is enough.
one_consumer = pytest.mark.parametrize("consumer", ["batch"])


@dataclass(frozen=True)
class Roles:
    owner_url: str
    app_url: str
    admin_url: str  # the superuser's, in the same database
    script_env: dict[str, str]  # what the roles script ran with


def run_roles_script(env: dict[str, str]) -> None:
    script = subprocess.run(
        ["bash", str(ROLES_SCRIPT)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0, script.stderr


def _psql_problem() -> str | None:
    return None if shutil.which("psql") else "psql (postgresql-client) is not installed"


@pytest.fixture
def roles(postgres_server_url: str, tmp_path: Path) -> Iterator[Roles]:
    """A fresh database with its owner and app roles, made by the init script itself."""
    if problem := _psql_problem():
        if IN_CI:
            pytest.fail(problem + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(problem)
    admin_url = database_url(postgres_server_url)
    suffix = uuid.uuid4().hex[:8]
    name, owner, app = f"mini_scan_roles_{suffix}", f"owner_{suffix}", f"app_{suffix}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    (tmp_path / "owner-password").write_text("owner password, with a quote '\n")
    (tmp_path / "app-password").write_text("app-password\n")
    script_env = {
        "PGHOST": admin_url.host or "127.0.0.1",
        "PGPORT": str(admin_url.port or 5432),
        "PGPASSWORD": admin_url.password or "",
        "POSTGRES_USER": admin_url.username or "postgres",
        "POSTGRES_DB": name,
        "MINI_SCAN_OWNER_ROLE": owner,
        "MINI_SCAN_APP_ROLE": app,
        "MINI_SCAN_OWNER_PASSWORD_FILE": str(tmp_path / "owner-password"),
        "MINI_SCAN_APP_PASSWORD_FILE": str(tmp_path / "app-password"),
    }
    run_roles_script(script_env)
    url = admin_url.set(database=name)
    yield Roles(
        owner_url=url.set(
            username=owner, password="owner password, with a quote '"
        ).render_as_string(hide_password=False),
        app_url=url.set(username=app, password="app-password").render_as_string(
            hide_password=False
        ),
        admin_url=url.render_as_string(hide_password=False),
        script_env=script_env,
    )
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{owner}", "{app}"')
    admin.dispose()


def mini_scan(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=variables | env,
    )


def migrate_as_owner(roles: Roles) -> None:
    engine = open_engine(roles.owner_url)
    migrate(engine)
    engine.dispose()


@one_consumer
def test_a_processor_with_the_dml_only_role_stores_every_message(
    emulator_host, make_pipeline, roles
):
    # Given the schema made by `mini-scan migrate` as the owner
    migrate_as_owner(roles)
    pipeline = make_pipeline(database_url=roles.app_url, migrate=False)
    items = observations(500, keys=40)

    # When a processor connected as the app role consumes a stream with re-scans
    stop = pipeline.start_processor()
    publish_observations(pipeline, items)

    # Then the table is the oracle's, and the canary (the refused-row check) works too
    assert reaches_oracle(pipeline, items)
    assert stop() == 0
    engine = open_engine(roles.app_url)
    assert Repository(engine).accepts_a_known_good_row()
    engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE services",
        "ALTER TABLE services ADD COLUMN extra integer",
        "CREATE TABLE extra (id integer)",
        "CREATE TEMPORARY TABLE extra (id integer)",
        "DELETE FROM services",
        "TRUNCATE services",
    ],
)
def test_the_app_role_cannot_change_the_schema_or_delete_rows(roles, statement: str):
    migrate_as_owner(roles)
    engine = open_engine(roles.app_url)
    try:
        with (
            pytest.raises(sa.exc.ProgrammingError, match=r"permission denied|must be owner"),
            engine.begin() as connection,
        ):
            connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


@one_consumer
def test_a_processor_that_does_not_migrate_exits_in_one_line_on_an_unmigrated_database(
    emulator_host, make_pipeline, roles, tmp_path
):
    # Given an empty database, and the app role's URL in a secret file
    pipeline = make_pipeline(database_url=roles.app_url)
    secret = tmp_path / "database-url"
    secret.write_text(roles.app_url + "\n")

    # When a processor with MIGRATE off starts on it
    result = mini_scan(
        "process",
        "--pubsub-subscription",
        pipeline.settings.pubsub_subscription,
        DATABASE_URL_FILE=str(secret),
        MIGRATE="false",
        STARTUP_TIMEOUT="2",
        METRICS_PORT="0",
        LOG_FORMAT="json",
    )

    # Then it waited, said why, and gave up in one line; it made no table, and never showed
    # the password
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "database schema not available after 2s" in last
    assert "at revision none" in last
    assert "mini-scan migrate" in last
    assert '"dependency": "database schema"' in result.stdout
    assert "app-password" not in result.stdout + result.stderr
    assert not sa.inspect(open_engine(roles.owner_url)).has_table("services")


@one_consumer
def test_a_processor_waiting_for_the_schema_starts_once_it_is_migrated(
    emulator_host, make_pipeline, spawn_processor, roles
):
    # Given a processor with MIGRATE off waiting on an empty database
    pipeline = make_pipeline(database_url=roles.app_url)
    child = spawn_processor(pipeline, MIGRATE="false", STARTUP_TIMEOUT="60")
    assert wait_until(
        lambda: any(e.get("dependency") == "database schema" for e in child.events()), timeout=30
    ), child.output()

    # When the owner migrates
    migrate_as_owner(roles)

    # Then the processor starts and stores what arrives
    child.wait_ready(timeout=30)
    items = observations(50, keys=10)
    publish_observations(pipeline, items)
    assert reaches_oracle(pipeline, items), child.output()


@one_consumer
def test_an_existing_database_upgrades_with_the_migrate_job_then_the_processors(
    emulator_host, make_pipeline, roles, tmp_path
):
    # Given a database an earlier version made (revision 0001) and wrote to
    owner = open_engine(roles.owner_url)
    migrate(owner, "0001")
    before = observations(30, keys=10, seed=2)
    Repository(owner).upsert_many(before)
    owner.dispose()

    # When the migrate job runs (from its secret file), then processors that do not migrate
    secret = tmp_path / "owner-url"
    secret.write_text(roles.owner_url)
    job = mini_scan("migrate", DATABASE_URL_FILE=str(secret))
    assert job.returncode == 0, job.stderr
    pipeline = make_pipeline(database_url=roles.app_url, migrate=False)
    stop = pipeline.start_processor()
    after = observations(100, keys=20, seed=3)
    publish_observations(pipeline, after)

    # Then the old rows and the new messages make one table
    assert reaches_oracle(pipeline, before + after)
    assert stop() == 0


def _has_password(admin_url: str, role: str, password: str) -> bool:
    """Whether the role's SCRAM verifier is the password's (the test server may trust every
    login, so logging in would not tell)."""
    engine = sa.create_engine(admin_url)
    with engine.connect() as connection:
        verifier = connection.exec_driver_sql(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
        ).scalar_one()
    engine.dispose()
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match, "not a SCRAM-SHA-256 verifier"
    iterations, salt, stored_key = int(match[1]), base64.b64decode(match[2]), match[3]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key


def test_the_roles_script_runs_again_and_adopts_the_tables_an_earlier_version_made(roles):
    # Given a database an earlier version made and wrote to as the superuser (revision 0001)
    admin = open_engine(roles.admin_url)
    migrate(admin, "0001")
    before = observations(30, keys=10, seed=4)
    Repository(admin).upsert_many(before)
    admin.dispose()

    # When the script runs again (the roles exist), with a new app role password
    Path(roles.script_env["MINI_SCAN_APP_PASSWORD_FILE"]).write_text("a new app password\n")
    run_roles_script(roles.script_env)

    # Then the app role has the new password, the owner owns the tables (it can migrate them
    # further), and the app role reads and writes their rows
    app_role = roles.script_env["MINI_SCAN_APP_ROLE"]
    assert _has_password(roles.admin_url, app_role, "a new app password")
    assert not _has_password(roles.admin_url, app_role, "app-password")
    migrate_as_owner(roles)
    after = observations(20, keys=20, seed=5)
    app = open_engine(roles.app_url)
    try:
        Repository(app).upsert_many(after)
        assert Repository(app).accepts_a_known_good_row()
        with app.connect() as connection:
            rows = connection.exec_driver_sql("SELECT count(*) FROM services").scalar_one()
        assert rows == len(expected_rows(before + after))
    finally:
        app.dispose()
