-- flowstate schema, version 8: a get_states page in one round trip.
-- Up to version 7 a page was two statements from the driver: the read horizon
-- (flowstate_rev_bound_after), then the rows below it. flowstate_read_states runs both: it is
-- VOLATILE, so each of its statements takes a new snapshot, the rows' after the horizon's, which
-- is all the proof of gap-freedom needs (docs/postgres.md). Its first row is a header: the
-- bound, the allocated head and the highest time mark (the other columns NULL); the page
-- follows. When the caller asks (marks_after >= 0) and the marks lag the bound by two blocks
-- or more, it first writes the time marks (flowstate_extend_time_marks); a role that may not
-- write gets -2 in the header and the query runs without them.

CREATE FUNCTION flowstate_read_states(own bigint, wait_ms integer, marks_after bigint, q text,
                                      nums bigint[], sets jsonb[])
RETURNS TABLE (rev bigint, id text, committed_at bigint, annotations jsonb, labels jsonb,
               transition_to text, transition_annotations jsonb,
               bound bigint, allocated bigint, marked bigint)
LANGUAGE plpgsql VOLATILE
SET max_parallel_workers_per_gather = 0  -- a page of 50 never repays starting workers
AS $$
DECLARE
    b bigint;
    a bigint;
    m bigint := marks_after;
BEGIN
    SELECT r.bound, r.allocated INTO b, a FROM flowstate_rev_bound_after(own, wait_ms) r;
    IF marks_after >= 0 AND b - 1 >= marks_after + 2048 THEN
        BEGIN
            m := flowstate_extend_time_marks(b);
        EXCEPTION WHEN insufficient_privilege OR read_only_sql_transaction THEN
            m := -2;
        END;
    END IF;
    bound := b;
    allocated := a;
    marked := m;
    RETURN NEXT;
    bound := NULL;
    allocated := NULL;
    marked := NULL;
    nums[1] := b;
    RETURN QUERY EXECUTE
        'SELECT p.*, NULL::bigint, NULL::bigint, NULL::bigint FROM (' || q || ') AS p'
        USING nums, sets;
END
$$;
