-- flowstate schema, version 2: delayed states become visible in offset order.
-- Offsets now come from flowstate_alloc_revs (the rev sequence, under its lock), so that offset
-- order equals xid order between transactions, and each row records its xid. Readers show a
-- delayed state only once its xid is below the xmin of their snapshot, exactly like the state
-- log: a delayer that has read offset N never later discovers a lower offset.

ALTER TABLE flowstate_delayed ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE flowstate_delayed ALTER COLUMN "offset" DROP DEFAULT;
DROP SEQUENCE IF EXISTS flowstate_delayed_offset_seq;
-- offsets handed out before this version must stay below every new one
SELECT setval('flowstate_rev_seq', m)
FROM (SELECT max("offset") AS m FROM flowstate_delayed) AS d
WHERE m > (SELECT last_value FROM flowstate_rev_seq);
