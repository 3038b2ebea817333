-- Each frame's verdict, once per (frame checksum, model name, model version): a frame classified again by
-- the same model (a redelivered event, a watcher restarted, the same file uploaded twice) adds nothing.
-- Named fits_* because, on the embedded default, every service's tables share one schema.
CREATE TABLE fits_verdicts (
    id              bigserial PRIMARY KEY,
    checksum        text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    source          text NOT NULL,
    size_bytes      bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('CLASSIFIED', 'UNREADABLE')),
    -- The class (CLASSIFIED) or 'unreadable'; the score is the class's probability.
    verdict         text NOT NULL,
    score           double precision CHECK (score IS NULL OR (score >= 0 AND score <= 1)),
    probabilities   jsonb,
    reason          text,
    hdu             text,
    annotated       text,
    seconds         double precision,
    classified_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (checksum, model_name, model_version)
);

CREATE INDEX fits_verdicts_by_time ON fits_verdicts (classified_at);
CREATE INDEX fits_verdicts_by_verdict ON fits_verdicts (verdict, classified_at);
