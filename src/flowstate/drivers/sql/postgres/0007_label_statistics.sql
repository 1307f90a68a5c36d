-- flowstate schema, version 7: finer statistics on labels, for the planner's index choice.
-- A label query is planned with its label set in view (version 6) and uses the GIN index when
-- the set is rare, walks by rev when it is frequent. PostgreSQL estimates how rare from samples
-- of whole label maps; at the default statistics target (100) a set held by 0.1 % of the versions
-- was estimated ten times too frequent and a page walked 50,000 versions of a 1M log (22 ms)
-- instead of fetching its 1,000 matches. The target is raised on both labels columns (ANALYZE
-- samples 300,000 rows instead of 30,000), and they are analyzed once now.

ALTER TABLE flowstate_states ALTER COLUMN labels SET STATISTICS 1000;
ALTER TABLE flowstate_latest ALTER COLUMN labels SET STATISTICS 1000;
ANALYZE flowstate_states (labels);
ANALYZE flowstate_latest (labels);
