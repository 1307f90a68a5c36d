-- flowstate schema, version 4: the rev allocation lock belongs to the schema.
-- Versions 1-3 took advisory lock 7262951127340385 in flowstate_alloc_revs: one key for the whole
-- database, so stores in different schemas of one database serialized each other's commits.
-- The key is now derived from the schema's name when this migration runs and written into the
-- function as a constant, so every process of the store takes the same lock whatever its
-- search_path, and stores in other schemas take other locks. flowstate_commit_one calls
-- flowstate_alloc_revs by name and needs no change.
-- The migration holds the old key while it replaces the function, so no allocation under the old
-- key is running when the new definition commits. (An old-definition call already queued for the
-- old key still runs after it, concurrently with new ones, for the few microseconds it holds the
-- lock: apply this version while the store is quiet if that matters to your readers.)

DO $migration$
DECLARE
    rev_lock bigint := hashtextextended('flowstate-revs:' || current_schema(), 0);
BEGIN
    PERFORM pg_advisory_xact_lock(7262951127340385);
    EXECUTE format($create$
-- A block of n consecutive revs; returns the first.
CREATE OR REPLACE FUNCTION flowstate_alloc_revs(n integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_rev bigint;
BEGIN
    -- The xid must be assigned inside the lock (and before any write of the transaction):
    -- then xid order and rev order agree between transactions. The lock key is this schema's.
    PERFORM pg_advisory_lock(%1$s);
    PERFORM pg_current_xact_id();
    last_rev := nextval('flowstate_rev_seq');
    IF n > 1 THEN
        PERFORM setval('flowstate_rev_seq', last_rev + n - 1);
        last_rev := last_rev + n - 1;
    END IF;
    PERFORM pg_advisory_unlock(%1$s);
    RETURN last_rev - n + 1;
END
$$
$create$, rev_lock);
    EXECUTE format(
        'COMMENT ON FUNCTION flowstate_alloc_revs(integer) IS %L',
        format('allocates revs under advisory lock %s (schema %s)', rev_lock, current_schema()));
END
$migration$;
