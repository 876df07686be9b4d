-- esframe projections, version 3. `{schema}` is replaced by the quoted schema name.
--
-- While a rebuild is unfinished, the log position it replays up to: handlers see the events
-- below it as replays even after a crash or a failover, and appends that update the projection
-- inline refuse to run on a half-rebuilt read model.
ALTER TABLE {schema}.projection_checkpoints ADD COLUMN replay_until BIGINT;
