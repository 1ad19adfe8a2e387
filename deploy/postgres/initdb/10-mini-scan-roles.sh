#!/usr/bin/env bash
# mini-scan's two PostgreSQL roles in POSTGRES_DB, as a role that may create roles (the server's
# superuser), over libpq's defaults (the server's Unix socket, or PGHOST). Safe to run again: it
# makes a role only if it is missing, and sets both passwords and every grant each time.
#
#   docker-compose.yml: the `postgres-roles` one-shot, before `migrate`, on every `up` (so a
#     `postgres-data` volume made before the roles existed gets them, and a changed password
#     file takes effect).
#   The local Kubernetes overlay: the postgres image's entrypoint runs /docker-entrypoint-initdb.d
#     when it initialises an empty data directory.
#
#   MINI_SCAN_OWNER_ROLE (miniscan_owner): owns the schema; `mini-scan migrate` connects as it.
#   MINI_SCAN_APP_ROLE (miniscan_app): the processors and the query commands; SELECT, INSERT,
#     UPDATE on every table the owner creates (default privileges), and nothing else: no DELETE,
#     TRUNCATE, DDL, temporary tables, or objects of its own.
#
# Tables already in `public` that the owner does not own (a database an earlier version made as
# the superuser) are handed to the owner, and the app role gets its three rights on them.
#
# Each password is read from a file (MINI_SCAN_OWNER_PASSWORD_FILE, MINI_SCAN_APP_PASSWORD_FILE),
# never from the environment, and reaches the server as a psql variable, quoted by psql.
set -e

owner_password="$(cat "${MINI_SCAN_OWNER_PASSWORD_FILE:?the file holding the owner role password}")"
app_password="$(cat "${MINI_SCAN_APP_PASSWORD_FILE:?the file holding the app role password}")"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" \
    --dbname "${POSTGRES_DB:?the database to make the roles in}" \
    -v database="$POSTGRES_DB" \
    -v owner="${MINI_SCAN_OWNER_ROLE:-miniscan_owner}" \
    -v app="${MINI_SCAN_APP_ROLE:-miniscan_app}" \
    -v owner_password="$owner_password" \
    -v app_password="$app_password" <<'SQL'
SELECT format('CREATE ROLE %I', name) FROM (VALUES (:'owner'), (:'app')) AS wanted (name)
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name)
\gexec
ALTER ROLE :"owner" LOGIN PASSWORD :'owner_password';
ALTER ROLE :"app" LOGIN PASSWORD :'app_password';

-- Only these two connect; PostgreSQL before 15 also let every role create in `public`.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"owner", :"app";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"app";

-- What the processors need: the upsert (INSERT ... ON CONFLICT DO UPDATE reads the row it
-- merges into) and reading alembic_version to check the schema is at the newest revision.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE ON TABLES TO :"app";

-- The tables an earlier version made as another role: the owner's from now on.
SELECT format('ALTER TABLE public.%I OWNER TO %I', tablename, :'owner') FROM pg_tables
    WHERE schemaname = 'public' AND tableowner <> :'owner'
\gexec
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO :"app";
SQL
