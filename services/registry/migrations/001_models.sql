-- The model registry: every trained model, by name and version (1, 2, ... per name), with what made it.
CREATE TABLE models (
    name        text NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    task        text NOT NULL,
    metrics     jsonb NOT NULL DEFAULT '{}',
    uri         text NOT NULL,
    job_id      text,
    created     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
