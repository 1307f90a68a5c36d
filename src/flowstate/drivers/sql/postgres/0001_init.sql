-- flowstate schema, version 1.
-- Revisions come from one sequence. flowstate_alloc_revs() hands out a block of revs while
-- holding an advisory lock, and assigns the transaction id inside that lock, so rev order
-- equals xid order between transactions; readers show only rows whose xid is below the xmin of their
-- snapshot, so a reader never sees rev N while a lower rev can still commit.

CREATE SEQUENCE flowstate_rev_seq;

CREATE TABLE flowstate_states (
    rev bigint PRIMARY KEY,
    id text NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    committed_at bigint NOT NULL,
    annotations jsonb NOT NULL,
    labels jsonb NOT NULL,
    transition_to text NOT NULL,
    transition_annotations jsonb NOT NULL
);
CREATE INDEX flowstate_states_by_id ON flowstate_states (id, rev);
CREATE INDEX flowstate_states_by_labels ON flowstate_states USING gin (labels jsonb_path_ops);
CREATE INDEX flowstate_states_by_time ON flowstate_states (committed_at);

CREATE TABLE flowstate_latest (
    id text PRIMARY KEY,
    rev bigint NOT NULL
);

CREATE TABLE flowstate_data (
    rev bigserial PRIMARY KEY,
    annotations jsonb NOT NULL,
    blob bytea NOT NULL
);

CREATE TABLE flowstate_delayed (
    "offset" bigserial PRIMARY KEY,
    execute_at bigint NOT NULL,
    state jsonb NOT NULL
);
CREATE INDEX flowstate_delayed_by_time ON flowstate_delayed (execute_at, "offset");

-- A block of n consecutive revs; returns the first.
CREATE FUNCTION flowstate_alloc_revs(n integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_rev bigint;
BEGIN
    -- The xid must be assigned inside the lock (and before any write of the transaction):
    -- then xid order and rev order agree between transactions.
    PERFORM pg_advisory_lock(7262951127340385);
    PERFORM pg_current_xact_id();
    last_rev := nextval('flowstate_rev_seq');
    IF n > 1 THEN
        PERFORM setval('flowstate_rev_seq', last_rev + n - 1);
        last_rev := last_rev + n - 1;
    END IF;
    PERFORM pg_advisory_unlock(7262951127340385);
    RETURN last_rev - n + 1;
END
$$;

-- Check and store the versions of one commit. Returns the ids whose latest rev is not the
-- expected one (nothing is stored then; the caller rolls back). Within one call the same id
-- may appear again, expecting the rev its previous row got.
-- Every id is locked first, in sorted order, so that two commits touching the same states in
-- different orders wait for each other instead of deadlocking. An id without a latest row is
-- claimed by inserting a placeholder row (rev 0), which the commit either overwrites or rolls
-- back; a concurrent insert of the same id waits on it.
CREATE FUNCTION flowstate_commit(
    ids text[], expected bigint[], revs bigint[], committed_at bigint[],
    annotations jsonb[], labels jsonb[], tos text[], transition_annotations jsonb[],
    channel text
) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    conflicts text[] := '{}';
    cur jsonb := '{}';
    sid text;
    found_rev bigint;
    i integer;
BEGIN
    FOR sid IN SELECT DISTINCT u FROM unnest(ids) AS u ORDER BY u LOOP
        INSERT INTO flowstate_latest (id, rev) VALUES (sid, 0) ON CONFLICT (id) DO NOTHING;
        IF FOUND THEN
            found_rev := 0;
        ELSE
            SELECT l.rev INTO found_rev FROM flowstate_latest l WHERE l.id = sid FOR UPDATE;
        END IF;
        cur := cur || jsonb_build_object(sid, found_rev);
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(ids, 1), 0) LOOP
        IF (cur ->> ids[i])::bigint <> expected[i] THEN
            IF NOT ids[i] = ANY(conflicts) THEN
                conflicts := conflicts || ids[i];
            END IF;
            CONTINUE;
        END IF;
        cur := cur || jsonb_build_object(ids[i], revs[i]);
    END LOOP;
    IF coalesce(array_length(conflicts, 1), 0) > 0 THEN
        RETURN conflicts;
    END IF;
    UPDATE flowstate_latest l SET rev = (cur ->> l.id)::bigint WHERE l.id = ANY(ids);
    INSERT INTO flowstate_states
        (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
    SELECT * FROM unnest(revs, ids, committed_at, annotations, labels, tos, transition_annotations);
    PERFORM pg_notify(channel, revs[array_length(revs, 1)]::text);
    RETURN conflicts;
END
$$;
