-- Convert the `services` table to 16 hash partitions on its key, in one transaction.
--
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/partition-services.sql
--
-- Run it as the table's owner while no processor writes (the table is locked and copied:
-- minutes per 100 M rows). Afterwards nothing changes for the processors: the same statements,
-- the same merge rule (the conflict key is the partition key), the same revision. Each partition
-- keeps the fillfactor of revision 0002. For another partition count, change `partitions` below
-- (a power of two: 64 suits 1-2 B rows). docs/capacity.md says when to do this.
-- Privileges granted on the old table go with it: the new one has its owner's default
-- privileges (ALTER DEFAULT PRIVILEGES); grant anything else again after this script.

BEGIN;

LOCK TABLE services IN ACCESS EXCLUSIVE MODE;

CREATE TABLE services_partitioned (LIKE services INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY HASH (ip, port, service);
ALTER TABLE services_partitioned
    ADD CONSTRAINT services_partitioned_pkey PRIMARY KEY (ip, port, service);

DO $$
DECLARE
    partitions CONSTANT integer := 16;
BEGIN
    FOR i IN 0 .. partitions - 1 LOOP
        EXECUTE 'CREATE TABLE services_p' || i || ' PARTITION OF services_partitioned'
            || ' FOR VALUES WITH (MODULUS ' || partitions || ', REMAINDER ' || i || ')'
            || ' WITH (fillfactor = 90)';
    END LOOP;
END
$$;

INSERT INTO services_partitioned SELECT * FROM services;

DROP TABLE services;
ALTER TABLE services_partitioned RENAME TO services;
ALTER TABLE services RENAME CONSTRAINT services_partitioned_pkey TO services_pkey;

COMMIT;
