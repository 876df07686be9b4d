-- esframe, version 7: partitioned projections and fenced leases. `{schema}` is replaced by the
-- quoted schema name.
--
-- Every event carries its stream's bucket (0 to 255, a hash of aggregate type and id), so that
-- one partition of a projection (a set of buckets) reads its own events through an index, in
-- log order, instead of every worker reading the whole log. Adding the column rewrites the
-- events table once.
ALTER TABLE {schema}.events
    ADD COLUMN stream_bucket SMALLINT NOT NULL
        GENERATED ALWAYS AS (
            (hashtextextended(aggregate_type || E'\x1f' || aggregate_id, 0) & 255)::smallint
        ) STORED;

CREATE INDEX events_stream_bucket_idx ON {schema}.events (stream_bucket, global_position);

-- A lease per projection partition, held by a runner until `expires_at` unless renewed. The
-- token grows each time the lease changes hands; checkpoint commits carry it, so a runner that
-- lost its lease cannot commit again. No session state: works through a connection pooler.
CREATE TABLE {schema}.projection_leases (
    projection TEXT        NOT NULL,
    partition  INTEGER     NOT NULL,
    holder     TEXT,
    token      BIGINT      NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    last_error TEXT,
    CONSTRAINT projection_leases_pkey PRIMARY KEY (projection, partition)
);

-- The live runners of each partitioned projection: each aims at its fair share of partitions.
CREATE TABLE {schema}.projection_members (
    projection TEXT        NOT NULL,
    member     TEXT        NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT projection_members_pkey PRIMARY KEY (projection, member)
);

-- How many partitions each projection is split into; changing it is a rebuild.
CREATE TABLE {schema}.projection_partitions (
    projection TEXT    NOT NULL,
    partitions INTEGER NOT NULL,
    CONSTRAINT projection_partitions_pkey PRIMARY KEY (projection),
    CONSTRAINT projection_partitions_count_check CHECK (partitions BETWEEN 1 AND 256)
);
