-- esframe projections, version 2. `{schema}` is replaced by the quoted schema name.
--
-- A checkpoint row moves only by compare-and-set, in the transaction that writes the
-- projection's read model, so read model and checkpoint always agree.
CREATE TABLE {schema}.projection_checkpoints (
    projection TEXT        NOT NULL,
    version    INTEGER     NOT NULL,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT projection_checkpoints_pkey PRIMARY KEY (projection),
    CONSTRAINT projection_checkpoints_position_check CHECK (position >= 0)
);

-- Events a projection failed on after every retry, parked so that it could go on.
CREATE TABLE {schema}.projection_dead_letters (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY,
    projection      TEXT        NOT NULL,
    global_position BIGINT      NOT NULL,
    event_id        UUID        NOT NULL,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL,
    event_type      TEXT        NOT NULL,
    error           TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT projection_dead_letters_pkey PRIMARY KEY (id)
);

CREATE INDEX projection_dead_letters_projection_idx
    ON {schema}.projection_dead_letters (projection, id);
