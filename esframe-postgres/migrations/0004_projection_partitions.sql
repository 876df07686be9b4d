-- esframe projections, version 4. `{schema}` is replaced by the quoted schema name.
--
-- Checkpoints and dead letters are kept per projection partition: a projection that is not
-- split has the single partition 0 (the rows of earlier versions).
ALTER TABLE {schema}.projection_checkpoints
    ADD COLUMN partition INTEGER NOT NULL DEFAULT 0,
    ADD CONSTRAINT projection_checkpoints_partition_check CHECK (partition BETWEEN 0 AND 65535),
    DROP CONSTRAINT projection_checkpoints_pkey,
    ADD CONSTRAINT projection_checkpoints_pkey PRIMARY KEY (projection, partition);

ALTER TABLE {schema}.projection_dead_letters
    ADD COLUMN partition INTEGER NOT NULL DEFAULT 0,
    ADD CONSTRAINT projection_dead_letters_partition_check CHECK (partition BETWEEN 0 AND 65535);

DROP INDEX {schema}.projection_dead_letters_projection_idx;
CREATE INDEX projection_dead_letters_projection_idx
    ON {schema}.projection_dead_letters (projection, partition, id);
