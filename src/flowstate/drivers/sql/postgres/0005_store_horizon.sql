-- flowstate schema, version 5: readers are held back only by this store's own in-flight commits.
-- Up to version 4 a reader showed a row only once its xid was below the xmin of its snapshot,
-- a horizon of the whole cluster: any write transaction left open anywhere froze every reader.
-- Now every allocation marks its block in flight with a transaction-level advisory lock whose
-- key is (this store's key, the block's first value), taken under the allocation lock before
-- the sequence moves; PostgreSQL releases it when the transaction commits, aborts or its server
-- process dies. flowstate_rev_bound() reads the allocated head, then the lowest block still
-- in flight: every rev below the result is finished, so a later statement may show all rows
-- below it (docs/postgres.md has the proof). Delayed-state offsets get their own sequence and
-- in-flight marks, read the same way by flowstate_offset_bound().
--
-- Lock keys (two-int4 advisory locks, objsubid 2 in pg_locks): classid = the 16-bit prefix
-- (store key << 1 | kind, kind 0 = revs, 1 = offsets) << 16 | bits 32-47 of the value,
-- objid = bits 0-31. The store key (15 bits) is unique among the flowstate schemas of this
-- database: chosen here, under a database-wide lock, past the keys other schemas took (named
-- in their functions' comments). Advisory locks of other databases never match.
--
-- Allocation still assigns the transaction id inside its lock: processes of earlier releases
-- sharing the schema read with the xid rule, which stays correct (only slower to show rows).
-- Delays of such processes still take offsets from the rev sequence: upgrade every process that
-- delays states before relying on offsets from the new sequence.

CREATE SEQUENCE flowstate_offset_seq;
-- offsets handed out before this version stay below every new one
SELECT setval('flowstate_offset_seq', m)
FROM (SELECT max("offset") AS m FROM flowstate_delayed) AS d
WHERE m IS NOT NULL;

DO $migration$
DECLARE
    rev_lock bigint := hashtextextended('flowstate-revs:' || current_schema(), 0);
    offset_lock bigint := hashtextextended('flowstate-offsets:' || current_schema(), 0);
    store integer := hashtext('flowstate-store:' || current_schema()) & 32767;
    taken integer[];
    tries integer := 0;
BEGIN
    -- No allocation under the old definition runs while the functions are replaced, and no
    -- transaction that wrote rows under it is still in flight when they commit.
    PERFORM pg_advisory_xact_lock(rev_lock);
    LOCK TABLE flowstate_states, flowstate_delayed IN SHARE MODE;
    -- one store at a time picks its key in this database
    PERFORM pg_advisory_xact_lock(hashtextextended('flowstate-store-keys', 0));
    SELECT array_agg(substring(obj_description(p.oid, 'pg_proc') FROM 'in-flight key (\d+)')::integer)
    INTO taken
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proname = 'flowstate_rev_bound' AND n.nspname <> current_schema();
    WHILE store = ANY(coalesce(taken, '{}')) LOOP
        store := (store + 1) & 32767;
        tries := tries + 1;
        IF tries > 32767 THEN
            RAISE EXCEPTION 'no free flowstate store key in this database';
        END IF;
    END LOOP;

    EXECUTE format($create$
-- A block of n consecutive revs; returns the first. The block is in flight until this
-- transaction ends.
CREATE OR REPLACE FUNCTION flowstate_alloc_revs(n integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first_rev bigint;
    got bigint;
BEGIN
    PERFORM pg_advisory_lock(%1$s);
    PERFORM pg_current_xact_id();  -- inside the lock: earlier releases read by xid
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
    INTO first_rev FROM flowstate_rev_seq;
    IF first_rev + n > 281474976710656 THEN  -- 2^48: the marks encode 48 bits
        PERFORM pg_advisory_unlock(%1$s);
        RAISE EXCEPTION 'flowstate revs are exhausted (2^48)';
    END IF;
    -- marked in flight before the sequence moves: a reader that sees the new head finds the mark
    PERFORM pg_advisory_xact_lock(
        ((%2$s::bigint << 16) | (first_rev >> 32))::bit(32)::integer, first_rev::bit(32)::integer);
    got := nextval('flowstate_rev_seq');
    IF got <> first_rev THEN  -- the sequence moved without this lock: refuse, readers rely on it
        PERFORM pg_advisory_unlock(%1$s);
        RAISE EXCEPTION 'flowstate_rev_seq moved outside flowstate_alloc_revs (%% <> %%)', got, first_rev;
    END IF;
    IF n > 1 THEN
        PERFORM setval('flowstate_rev_seq', first_rev + n - 1);
    END IF;
    PERFORM pg_advisory_unlock(%1$s);
    RETURN first_rev;
END
$$;

-- The read horizon: every rev below bound is finished (committed, or never will be); revs at
-- or above it may still commit and must not be shown. allocated is the highest rev handed out.
-- The statements run in this order, each after the one before: the head, then the in-flight
-- marks. A reader shows rows below bound in a later statement (a later snapshot).
CREATE OR REPLACE FUNCTION flowstate_rev_bound(OUT bound bigint, OUT allocated bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
    INTO allocated FROM flowstate_rev_seq;
    SELECT min(((l.classid::bigint & 65535) << 32) | l.objid::bigint) INTO bound
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.mode = 'ExclusiveLock'
      AND l.classid::bigint >> 16 = %2$s
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
    bound := least(coalesce(bound, allocated + 1), allocated + 1);
END
$$;

-- Like flowstate_rev_bound, but first waits (at most wait_ms) until bound exceeds want: for
-- each lowest in-flight block, on its mark (a shared lock, which readers do not count).
CREATE OR REPLACE FUNCTION flowstate_rev_bound_after(want bigint, wait_ms integer,
    OUT bound bigint, OUT allocated bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => wait_ms / 1000.0);
    left_ms integer;
BEGIN
    LOOP
        SELECT b.bound, b.allocated INTO bound, allocated FROM flowstate_rev_bound() b;
        left_ms := floor(extract(epoch FROM deadline - clock_timestamp()) * 1000);
        IF bound > want OR left_ms <= 0 THEN
            RETURN;
        END IF;
        PERFORM set_config('lock_timeout', left_ms || 'ms', true);
        BEGIN
            PERFORM pg_advisory_xact_lock_shared(
                ((%2$s::bigint << 16) | (bound >> 32))::bit(32)::integer, bound::bit(32)::integer);
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- the deadline passed: the loop returns the bound as it is
        END;
    END LOOP;
END
$$;

-- The highest rev a reader may show now (0 if none): /health, the UI, where watchers start.
CREATE OR REPLACE FUNCTION flowstate_head() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    b bigint;
    head bigint;
BEGIN
    SELECT r.bound INTO b FROM flowstate_rev_bound() r;
    SELECT max(rev) INTO head FROM flowstate_states WHERE rev < b;
    RETURN coalesce(head, 0);
END
$$;

-- The in-flight blocks of this store, lowest first, with who holds them: for an operator.
CREATE OR REPLACE FUNCTION flowstate_in_flight()
RETURNS TABLE (kind text, first_value bigint, pid integer, xact_start timestamptz,
               application_name text, state text)
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN l.classid::bigint >> 16 = %2$s THEN 'rev' ELSE 'offset' END,
           ((l.classid::bigint & 65535) << 32) | l.objid::bigint,
           l.pid, a.xact_start, a.application_name, a.state
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.mode = 'ExclusiveLock'
      AND l.classid::bigint >> 16 IN (%2$s, %4$s)
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ORDER BY 1 DESC, 2
$$;

-- A block of n consecutive delayed-state offsets, from their own sequence; returns the first.
CREATE OR REPLACE FUNCTION flowstate_alloc_offsets(n integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first_offset bigint;
    got bigint;
BEGIN
    PERFORM pg_advisory_lock(%3$s);
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
    INTO first_offset FROM flowstate_offset_seq;
    IF first_offset + n > 281474976710656 THEN  -- 2^48: the marks encode 48 bits
        PERFORM pg_advisory_unlock(%3$s);
        RAISE EXCEPTION 'flowstate delayed offsets are exhausted (2^48)';
    END IF;
    PERFORM pg_advisory_xact_lock(
        ((%4$s::bigint << 16) | (first_offset >> 32))::bit(32)::integer,
        first_offset::bit(32)::integer);
    got := nextval('flowstate_offset_seq');
    IF got <> first_offset THEN
        PERFORM pg_advisory_unlock(%3$s);
        RAISE EXCEPTION 'flowstate_offset_seq moved outside flowstate_alloc_offsets';
    END IF;
    IF n > 1 THEN
        PERFORM setval('flowstate_offset_seq', first_offset + n - 1);
    END IF;
    PERFORM pg_advisory_unlock(%3$s);
    RETURN first_offset;
END
$$;

-- flowstate_rev_bound for delayed-state offsets.
CREATE OR REPLACE FUNCTION flowstate_offset_bound() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    allocated bigint;
    bound bigint;
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
    INTO allocated FROM flowstate_offset_seq;
    SELECT min(((l.classid::bigint & 65535) << 32) | l.objid::bigint) INTO bound
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.mode = 'ExclusiveLock'
      AND l.classid::bigint >> 16 = %4$s
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
    RETURN least(coalesce(bound, allocated + 1), allocated + 1);
END
$$;
$create$, rev_lock, store * 2, offset_lock, store * 2 + 1);
    EXECUTE format(
        'COMMENT ON FUNCTION flowstate_rev_bound() IS %L',
        format('in-flight key %s (schema %s): rev marks use prefix %s, offset marks %s',
               store, current_schema(), store * 2, store * 2 + 1));
    EXECUTE format(
        'COMMENT ON FUNCTION flowstate_alloc_revs(integer) IS %L',
        format('allocates revs under advisory lock %s (schema %s)', rev_lock, current_schema()));
END
$migration$;
