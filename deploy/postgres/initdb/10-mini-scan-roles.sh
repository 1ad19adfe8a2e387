#!/usr/bin/env bash
# mini-scan's two PostgreSQL roles, made once in POSTGRES_DB when the postgres image initialises
# an empty data directory (its entrypoint runs /docker-entrypoint-initdb.d/*.sh as the postgres
# user, with the server listening on its socket only). Used by docker-compose.yml's `postgres`
# profile and the local Kubernetes overlay.
#
#   MINI_SCAN_OWNER_ROLE (miniscan_owner): owns the schema; `mini-scan migrate` connects as it.
#   MINI_SCAN_APP_ROLE (miniscan_app): the processors and the query commands; SELECT, INSERT,
#     UPDATE on every table the owner creates (default privileges), and nothing else: no DELETE,
#     TRUNCATE, DDL, temporary tables, or objects of its own.
#
# Each password is read from a file (MINI_SCAN_OWNER_PASSWORD_FILE, MINI_SCAN_APP_PASSWORD_FILE),
# never from the environment, and reaches the server as a psql variable, quoted by psql.
set -e

owner_password="$(cat "${MINI_SCAN_OWNER_PASSWORD_FILE:?the file holding the owner role password}")"
app_password="$(cat "${MINI_SCAN_APP_PASSWORD_FILE:?the file holding the app role password}")"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v database="$POSTGRES_DB" \
    -v owner="${MINI_SCAN_OWNER_ROLE:-miniscan_owner}" \
    -v app="${MINI_SCAN_APP_ROLE:-miniscan_app}" \
    -v owner_password="$owner_password" \
    -v app_password="$app_password" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN PASSWORD :'app_password';

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
SQL
