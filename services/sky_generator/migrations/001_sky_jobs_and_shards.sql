-- Sky jobs and their shards. A shard is rendered by one worker at a time (a lease, extended while it
-- works) and recorded DONE once, by an UPDATE guarded by its status; a job ends when no shard is open.
-- Named sky_* because, on the embedded default, every service's tables share one schema.
CREATE TABLE sky_jobs (
    id              text PRIMARY KEY,
    job             jsonb NOT NULL,
    status          text NOT NULL
                    CHECK (status IN ('STARTED', 'IN_PROGRESS', 'SUCCESS', 'PARTIAL', 'FAILED')),
    reason          text,
    output          text NOT NULL,
    shards_total    integer NOT NULL,
    frames_total    integer NOT NULL,
    frames_done     integer NOT NULL DEFAULT 0,
    manifest        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE TABLE sky_shards (
    job_id          text NOT NULL REFERENCES sky_jobs (id) ON DELETE CASCADE,
    shard           integer NOT NULL,
    frames          integer NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'RUNNING', 'DONE', 'FAILED')),
    attempts        integer NOT NULL DEFAULT 0,
    worker          text,
    lease_until     timestamptz,
    seconds         double precision,
    -- The geometry check over the shard's frames: median of the frames' median errors, worst star.
    median_px       double precision,
    worst_px        double precision,
    proven          integer,
    error           text,
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (job_id, shard)
);

CREATE INDEX sky_shards_open ON sky_shards (job_id) WHERE status IN ('PENDING', 'RUNNING');
