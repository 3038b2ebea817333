-- Training jobs: one row per job id, from QUEUED through RUNNING to SUCCESS or FAILED. A job that stops
-- (instance stopped, worker died) goes back to QUEUED and resumes from its checkpoint on the next delivery.
CREATE TABLE training_jobs (
    id              text PRIMARY KEY,
    request         jsonb,
    task            text,
    status          text NOT NULL CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCESS', 'FAILED')),
    reason          text,
    model_uri       text,
    registered      text,
    worker          text,
    attempts        integer NOT NULL DEFAULT 0,
    step            integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
