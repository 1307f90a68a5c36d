-- flowstate schema, version 3: a commit in one statement, and no NOTIFY inside commits.
-- A transaction that has issued NOTIFY takes a cluster-wide lock at commit and holds it through
-- the WAL flush, so such commits cannot share a flush. The driver now announces new revs after
-- its commits return, on a connection of its own; the functions below do not notify.
-- flowstate_commit (version 1) stays, unchanged, for processes of earlier releases.

-- Check and store the versions of one commit; returns the ids whose latest rev is not the
-- expected one (nothing is stored then; the caller rolls back). The same id may appear again,
-- expecting the rev its previous row got. Ids are locked in sorted order (by the UPDATE of their
-- latest row, or by inserting it), so commits touching the same states in different orders wait
-- for each other instead of deadlocking.
CREATE FUNCTION flowstate_store_versions(
    ids text[], expected bigint[], revs bigint[], committed_at bigint[],
    annotations jsonb[], labels jsonb[], tos text[], transition_annotations jsonb[]
) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    conflicts text[] := '{}';
    sid text;
    want bigint;
    last_rev bigint;
    broken boolean;
BEGIN
    FOR sid, want, last_rev, broken IN
        SELECT c.id,
               min(c.e) FILTER (WHERE c.k = 1),
               max(c.r),
               coalesce(bool_or(c.k > 1 AND c.e IS DISTINCT FROM c.prev), false)
        FROM (
            SELECT t.id, t.e, t.r,
                   row_number() OVER w AS k,
                   lag(t.r) OVER w AS prev
            FROM unnest(ids, expected, revs) WITH ORDINALITY AS t(id, e, r, o)
            WINDOW w AS (PARTITION BY t.id ORDER BY t.o)
        ) AS c
        GROUP BY c.id
        ORDER BY c.id
    LOOP
        IF broken THEN
            conflicts := conflicts || sid;
            CONTINUE;
        END IF;
        UPDATE flowstate_latest SET rev = last_rev WHERE id = sid AND rev = want;
        IF NOT FOUND THEN
            IF want = 0 THEN
                INSERT INTO flowstate_latest (id, rev) VALUES (sid, last_rev)
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

-- A whole commit of state versions as one statement (run it outside a transaction block: its
-- implicit transaction is the commit). Allocates the revs with flowstate_alloc_revs first, so
-- the transaction id is assigned under the allocation lock before any write, then stores the
-- versions and returns the first rev; version i gets first + i - 1. A negative expected rev -k
-- stands for the rev of the k-th version of this call (the same state written again). On a
-- conflict it raises SQLSTATE FS001 with the conflicting ids as a JSON array in DETAIL, which
-- rolls everything back.
CREATE FUNCTION flowstate_commit_one(
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
        UPDATE flowstate_latest SET rev = first_rev WHERE id = ids[1] AND rev = expected[1];
        IF NOT FOUND THEN
            IF expected[1] = 0 THEN
                INSERT INTO flowstate_latest (id, rev) VALUES (ids[1], first_rev)
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
