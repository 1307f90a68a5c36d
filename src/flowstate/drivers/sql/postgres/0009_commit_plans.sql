-- flowstate schema, version 9: commits keep using the index on flowstate_latest as it grows.
-- PL/pgSQL caches the plan of each statement per connection, and after five runs keeps a generic
-- plan made from the statistics of that moment. A connection opened on a young store planned the
-- point lookups of flowstate_latest (by id, in flowstate_store_versions and flowstate_commit_one)
-- as sequential scans of a near-empty table and kept them until an ANALYZE invalidated them: a
-- commit of 1,000 new states read the whole table 1,000 times (1.6 s per commit at 30k states
-- against 30 ms with the index). Sequential scans are penalized inside the two functions, so the
-- primary key is used whatever the statistics say; both functions only look up rows by key.
-- JIT is off in them too: the penalty lifts the cost of the one scan left (the read of the rev
-- sequence in flowstate_alloc_revs) past jit_above_cost, and compiling it took 15 ms a commit.

ALTER FUNCTION flowstate_store_versions(text[], bigint[], bigint[], bigint[], jsonb[], jsonb[],
                                        text[], jsonb[])
    SET enable_seqscan = off SET jit = off;
ALTER FUNCTION flowstate_commit_one(text[], bigint[], bigint[], jsonb[], jsonb[], text[], jsonb[])
    SET enable_seqscan = off SET jit = off;
