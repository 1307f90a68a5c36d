-- flowstate schema, version 6: read queries served by indexes whatever the size of the log.
--
-- 1. flowstate_latest also keeps the labels of each state's latest version (labels_rev: the rev
--    they belong to, always equal to rev), indexed by rev and by GIN, so a latest_only query
--    walks the latest versions only, never the superseded ones. The commit functions keep them
--    (all three are replaced below, so processes of earlier releases, which call them by name,
--    keep them too). The CHECK makes a write that does not (a call of an earlier definition
--    already running while this migration commits) fail instead of leaving stale labels.
-- 2. flowstate_time_marks: running maxima of committed_at by block of 1,024 revs ("every row
--    with rev <= mark.rev has committed_at <= mark.max_at"), written by readers for finished
--    blocks (below the read horizon, hence immutable). A since_time query starts its walk of
--    the log after the last mark below its time instead of at rev 0.
--    The index on committed_at is dropped: no query of this release reads it.
-- 3. flowstate_query_states(q, nums, sets) runs a read query with its parameters bound when it
--    is planned: the planner sees the label sets and the time, and chooses between the GIN
--    and the rev-ordered indexes by them (a prepared statement's generic plan cannot).

ALTER TABLE flowstate_latest ADD COLUMN labels jsonb, ADD COLUMN labels_rev bigint;
UPDATE flowstate_latest l SET labels = s.labels, labels_rev = l.rev
FROM flowstate_states s WHERE s.rev = l.rev;
UPDATE flowstate_latest SET labels = '{}', labels_rev = rev WHERE labels IS NULL;
ALTER TABLE flowstate_latest
    ALTER COLUMN labels SET NOT NULL,
    ALTER COLUMN labels_rev SET NOT NULL,
    ADD CONSTRAINT flowstate_latest_labels_current CHECK (labels_rev = rev);
CREATE INDEX flowstate_latest_by_rev ON flowstate_latest (rev);
CREATE INDEX flowstate_latest_by_labels ON flowstate_latest USING gin (labels jsonb_path_ops);

-- since_time queries start after their time mark and walk the log by rev: the index on
-- committed_at (one more entry per version written) is no longer read
DROP INDEX IF EXISTS flowstate_states_by_time;

CREATE TABLE flowstate_time_marks (
    rev bigint PRIMARY KEY,
    max_at bigint NOT NULL
);
CREATE INDEX flowstate_time_marks_by_at ON flowstate_time_marks (max_at, rev);

-- Write the marks of every block of 1,024 revs wholly below bound (a read horizon computed in
-- an earlier statement); returns the highest mark. Concurrent callers write the same values.
CREATE FUNCTION flowstate_extend_time_marks(bound bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last_rev bigint;
    last_at bigint;
    target bigint := (bound >> 10 << 10) - 1;  -- the last rev of the last finished block
BEGIN
    SELECT m.rev, m.max_at INTO last_rev, last_at
    FROM flowstate_time_marks m ORDER BY m.rev DESC LIMIT 1;
    last_rev := coalesce(last_rev, -1);
    IF target <= last_rev THEN
        RETURN last_rev;
    END IF;
    INSERT INTO flowstate_time_marks (rev, max_at)
    SELECT (b.block << 10) + 1023,
           greatest(last_at, max(b.max_at) OVER (ORDER BY b.block))
    FROM (SELECT s.rev >> 10 AS block, max(s.committed_at) AS max_at
          FROM flowstate_states s WHERE s.rev > last_rev AND s.rev <= target
          GROUP BY 1) AS b
    ON CONFLICT (rev) DO NOTHING;
    RETURN target;
END
$$;

CREATE FUNCTION flowstate_query_states(q text, nums bigint[], sets jsonb[])
RETURNS TABLE (rev bigint, id text, committed_at bigint, annotations jsonb, labels jsonb,
               transition_to text, transition_annotations jsonb)
LANGUAGE plpgsql STABLE
SET max_parallel_workers_per_gather = 0  -- a page of 50 never repays starting workers
AS $$
BEGIN
    RETURN QUERY EXECUTE q USING nums, sets;
END
$$;

-- Versions 3-5, now also keeping each state's latest labels.
CREATE OR REPLACE FUNCTION flowstate_store_versions(
    ids text[], expected bigint[], revs bigint[], committed_at bigint[],
    annotations jsonb[], labels jsonb[], tos text[], transition_annotations jsonb[]
) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    conflicts text[] := '{}';
    sid text;
    want bigint;
    last_rev bigint;
    last_labels jsonb;
    broken boolean;
BEGIN
    FOR sid, want, last_rev, last_labels, broken IN
        SELECT c.id,
               min(c.e) FILTER (WHERE c.k = 1),
               max(c.r),
               (array_agg(c.lab ORDER BY c.k DESC))[1],
               coalesce(bool_or(c.k > 1 AND c.e IS DISTINCT FROM c.prev), false)
        FROM (
            SELECT t.id, t.e, t.r, t.lab,
                   row_number() OVER w AS k,
                   lag(t.r) OVER w AS prev
            FROM unnest(ids, expected, revs, labels) WITH ORDINALITY AS t(id, e, r, lab, o)
            WINDOW w AS (PARTITION BY t.id ORDER BY t.o)
        ) AS c
        GROUP BY c.id
        ORDER BY c.id
    LOOP
        IF broken THEN
            conflicts := conflicts || sid;
            CONTINUE;
        END IF;
        UPDATE flowstate_latest SET rev = last_rev, labels = last_labels, labels_rev = last_rev
        WHERE id = sid AND rev = want;
        IF NOT FOUND THEN
            IF want = 0 THEN
                INSERT INTO flowstate_latest (id, rev, labels, labels_rev)
                VALUES (sid, last_rev, last_labels, last_rev)
                ON CONFLICT (id) DO NOTHING;
            END IF;
            IF want <> 0 OR NOT FOUND THEN
                conflicts := conflicts || sid;
            END IF;
        END IF;
    END LOOP;
    IF cardinality(conflicts) > 0 THEN
        RETURN conflicts;
    END IF;
    INSERT INTO flowstate_states
        (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
    SELECT * FROM unnest(revs, ids, committed_at, annotations, labels, tos, transition_annotations);
    RETURN conflicts;
END
$$;

CREATE OR REPLACE FUNCTION flowstate_commit_one(
    ids text[], expected bigint[], committed_at bigint[],
    annotations jsonb[], labels jsonb[], tos text[], transition_annotations jsonb[]
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(ids);
    first_rev bigint;
    revs bigint[];
    wants bigint[];
    conflicts text[];
BEGIN
    first_rev := flowstate_alloc_revs(n);
    IF n = 1 THEN  -- the common commit, without the bookkeeping of the general case
        UPDATE flowstate_latest
        SET rev = first_rev, labels = flowstate_commit_one.labels[1], labels_rev = first_rev
        WHERE id = ids[1] AND rev = expected[1];
        IF NOT FOUND THEN
            IF expected[1] = 0 THEN
                INSERT INTO flowstate_latest (id, rev, labels, labels_rev)
                VALUES (ids[1], first_rev, labels[1], first_rev)
                ON CONFLICT (id) DO NOTHING;
            END IF;
            IF expected[1] <> 0 OR NOT FOUND THEN
                RAISE EXCEPTION 'rev mismatch' USING ERRCODE = 'FS001',
                    DETAIL = array_to_json(ids)::text;
            END IF;
        END IF;
        INSERT INTO flowstate_states
            (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
        VALUES (first_rev, ids[1], committed_at[1], annotations[1], labels[1], tos[1],
                transition_annotations[1]);
        RETURN first_rev;
    END IF;
    SELECT array_agg(first_rev + t.o - 1 ORDER BY t.o),
           array_agg(CASE WHEN t.e < 0 THEN first_rev - t.e - 1 ELSE t.e END ORDER BY t.o)
    INTO revs, wants
    FROM unnest(expected) WITH ORDINALITY AS t(e, o);
    conflicts := flowstate_store_versions(
        ids, wants, revs, committed_at, annotations, labels, tos, transition_annotations);
    IF cardinality(conflicts) > 0 THEN
        RAISE EXCEPTION 'rev mismatch' USING ERRCODE = 'FS001',
            DETAIL = array_to_json(conflicts)::text;
    END IF;
    RETURN first_rev;
END
$$;

-- Version 1 (kept for processes of releases before version 3), keeping the latest labels.
CREATE OR REPLACE FUNCTION flowstate_commit(
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
        INSERT INTO flowstate_latest (id, rev, labels, labels_rev) VALUES (sid, 0, '{}', 0)
        ON CONFLICT (id) DO NOTHING;
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
    UPDATE flowstate_latest l SET rev = v.rev, labels = v.labels, labels_rev = v.rev
    FROM (SELECT DISTINCT ON (t.id) t.id, t.rev, t.labels
          FROM unnest(ids, revs, labels) WITH ORDINALITY AS t(id, rev, labels, o)
          ORDER BY t.id, t.o DESC) AS v
    WHERE l.id = v.id;
    INSERT INTO flowstate_states
        (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
    SELECT * FROM unnest(revs, ids, committed_at, annotations, labels, tos, transition_annotations);
    PERFORM pg_notify(channel, revs[array_length(revs, 1)]::text);
    RETURN conflicts;
END
$$;

-- the marks of what is already stored
SELECT flowstate_extend_time_marks((SELECT b.bound FROM flowstate_rev_bound() b));
