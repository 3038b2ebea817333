-- Jobs and their regions. A region is done at most once: its result is stored by the same UPDATE that marks
-- it DONE, guarded by its status; the job's finalisation is claimed by one guarded UPDATE.
CREATE TABLE jobs (
    id              text PRIMARY KEY,
    request         jsonb,
    status          text NOT NULL
                    CHECK (status IN ('STARTED', 'IN_PROGRESS', 'SUCCESS', 'PARTIAL', 'FAILED')),
    reason          text,
    image           text,
    model           text,
    regions_total   integer,
    tiles_total     integer,
    tiles           integer,
    detections      integer,
    output_uris     text[] NOT NULL DEFAULT '{}',
    -- Which worker merges the regions and writes the output, and until when its claim holds.
    finaliser       text,
    finalise_until  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE TABLE regions (
    job_id          text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    region_index    integer NOT NULL,
    col_off         integer NOT NULL,
    row_off         integer NOT NULL,
    width           integer NOT NULL,
    height          integer NOT NULL,
    tiles_total     integer NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'RUNNING', 'DONE', 'FAILED')),
    attempts        integer NOT NULL DEFAULT 0,
    worker          text,
    lease_until     timestamptz,
    tiles           integer,
    detections      integer,
    seconds         double precision,
    -- The region's merged detections in image pixels: an .npz of boxes, scores and labels.
    result          bytea,
    error           text,
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (job_id, region_index)
);

-- Finalisation asks "is any region of this job still open?" after every region.
CREATE INDEX regions_open ON regions (job_id) WHERE status IN ('PENDING', 'RUNNING');
