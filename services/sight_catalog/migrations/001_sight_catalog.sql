-- The sight catalog's warehouse: cities, their sights, images (the encoded bytes live in S3), labels (boxes,
-- and who drew them), each city's models, and the data marts the refresher reads.
-- Named sight_* because, on the embedded default, every service's tables share one schema.

-- A city the catalog collects. Names are compared case-insensitively and stored as given; the slug names
-- the city in S3 keys and model names. The labelling budget caps the calls to an external labeller (a cloud
-- vision API) per city: label_calls_used can never pass it (the CHECK holds under concurrent workers, and
-- the budget is spent with one conditional UPDATE, see services/sight_catalog/labels.py).
CREATE TABLE sight_cities (
    id                bigserial PRIMARY KEY,
    name              text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 100),
    slug              text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    label_budget      integer NOT NULL DEFAULT 0 CHECK (label_budget >= 0),
    label_calls_used  integer NOT NULL DEFAULT 0 CHECK (label_calls_used >= 0),
    requested_by      text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (label_calls_used <= label_budget)
);
CREATE UNIQUE INDEX sight_cities_by_name ON sight_cities (lower(name));

-- A landmark of a city; its name is the detector's class name.
CREATE TABLE sight_sights (
    id          bigserial PRIMARY KEY,
    city_id     bigint NOT NULL REFERENCES sight_cities (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (city_id, name)
);

-- An image, stored once per city by the MD5 of its encoded bytes (as received, EXIF orientation applied
-- to the stored copy), at s3_key in the datasets bucket. sight_id is the sight the source said it shows
-- (NULL: unknown); held_out images are never trained on (they measure the city's model).
CREATE TABLE sight_images (
    id            bigserial PRIMARY KEY,
    city_id       bigint NOT NULL REFERENCES sight_cities (id) ON DELETE CASCADE,
    sight_id      bigint REFERENCES sight_sights (id) ON DELETE SET NULL,
    md5           text NOT NULL CHECK (md5 ~ '^[0-9a-f]{32}$'),
    s3_key        text NOT NULL,
    source        text NOT NULL,
    media_type    text NOT NULL CHECK (media_type IN ('image/jpeg', 'image/png', 'image/webp')),
    width         integer NOT NULL CHECK (width > 0),
    height        integer NOT NULL CHECK (height > 0),
    size_bytes    bigint NOT NULL CHECK (size_bytes > 0),
    held_out      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (city_id, md5)
);
CREATE INDEX sight_images_by_city ON sight_images (city_id, id);

-- Who looked at an image: one row per (image, labeller), also when it found nothing (boxes = 0), so an
-- image is not sent to the same labeller twice. labeller: 'annotator:<name>', 'model:<name>@<version>' or
-- 'rekognition'.
CREATE TABLE sight_labellings (
    image_id     bigint NOT NULL REFERENCES sight_images (id) ON DELETE CASCADE,
    labeller     text NOT NULL CHECK (length(labeller) BETWEEN 1 AND 200),
    boxes        integer NOT NULL CHECK (boxes >= 0),
    labelled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, labeller)
);

-- A box on an image: pixel coordinates of the stored (orientation-applied) image, x0 < x1, y0 < y1.
CREATE TABLE sight_labels (
    id          bigserial PRIMARY KEY,
    image_id    bigint NOT NULL REFERENCES sight_images (id) ON DELETE CASCADE,
    sight_id    bigint NOT NULL REFERENCES sight_sights (id) ON DELETE CASCADE,
    labeller    text NOT NULL,
    x0          double precision NOT NULL CHECK (x0 >= 0),
    y0          double precision NOT NULL CHECK (y0 >= 0),
    x1          double precision NOT NULL,
    y1          double precision NOT NULL,
    score       double precision CHECK (score IS NULL OR (score >= 0 AND score <= 1)),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (x1 > x0 AND y1 > y0),
    FOREIGN KEY (image_id, labeller) REFERENCES sight_labellings (image_id, labeller) ON DELETE CASCADE
);
CREATE INDEX sight_labels_by_image ON sight_labels (image_id);

-- A city's models, version 1, 2, ...: TRAINING from the moment its training job is on the queue, READY
-- once the trainer registered it (registry_name, registry_version in the registry's models table), FAILED
-- with the reason. Recognitions use the city's newest READY model.
CREATE TABLE sight_models (
    id                bigserial PRIMARY KEY,
    city_id           bigint NOT NULL REFERENCES sight_cities (id) ON DELETE CASCADE,
    version           integer NOT NULL CHECK (version >= 1),
    status            text NOT NULL CHECK (status IN ('TRAINING', 'READY', 'FAILED')),
    training_job_id   text NOT NULL UNIQUE,
    dataset           text NOT NULL,
    classes           jsonb NOT NULL,
    images            integer NOT NULL CHECK (images >= 0),
    registry_name     text NOT NULL,
    registry_version  integer,
    model_uri         text,
    metrics           jsonb NOT NULL DEFAULT '{}',
    reason            text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (city_id, version),
    CHECK (status <> 'READY' OR (registry_version IS NOT NULL AND model_uri IS NOT NULL))
);
-- At most one training at a time per city.
CREATE UNIQUE INDEX sight_models_one_training ON sight_models (city_id) WHERE status = 'TRAINING';

-- Data marts, refreshed CONCURRENTLY by the refresher (each needs a unique index for that).
-- Per city: what the refresher picks cities by, and what the API and web UI show.
CREATE MATERIALIZED VIEW sight_city_mart AS
SELECT
    c.id AS city_id,
    c.name,
    c.slug,
    (SELECT count(*) FROM sight_sights s WHERE s.city_id = c.id) AS sights,
    (SELECT count(*) FROM sight_images i WHERE i.city_id = c.id) AS images,
    (SELECT count(*) FROM sight_images i WHERE i.city_id = c.id
        AND EXISTS (SELECT 1 FROM sight_labellings l WHERE l.image_id = i.id)) AS labelled_images,
    (SELECT count(*) FROM sight_images i WHERE i.city_id = c.id
        AND NOT EXISTS (SELECT 1 FROM sight_labellings l WHERE l.image_id = i.id)) AS unlabelled_images,
    (SELECT count(*) FROM sight_labels b JOIN sight_images i ON i.id = b.image_id
        WHERE i.city_id = c.id) AS labels,
    (SELECT max(l.labelled_at) FROM sight_labellings l JOIN sight_images i ON i.id = l.image_id
        WHERE i.city_id = c.id) AS last_labelled_at,
    (SELECT max(m.version) FROM sight_models m WHERE m.city_id = c.id AND m.status = 'READY')
        AS model_version,
    EXISTS (SELECT 1 FROM sight_models m WHERE m.city_id = c.id AND m.status = 'TRAINING') AS training,
    now() AS refreshed_at
FROM sight_cities c
WITH DATA;
CREATE UNIQUE INDEX sight_city_mart_key ON sight_city_mart (city_id);

-- Per sight: labelled images (not held out) and boxes, for the "enough per label" rule.
CREATE MATERIALIZED VIEW sight_label_mart AS
SELECT
    s.id AS sight_id,
    s.city_id,
    s.name,
    count(DISTINCT b.image_id) FILTER (WHERE NOT i.held_out) AS training_images,
    count(b.id) FILTER (WHERE NOT i.held_out) AS training_labels,
    count(DISTINCT b.image_id) FILTER (WHERE i.held_out) AS held_out_images
FROM sight_sights s
LEFT JOIN sight_labels b ON b.sight_id = s.id
LEFT JOIN sight_images i ON i.id = b.image_id
GROUP BY s.id, s.city_id, s.name
WITH DATA;
CREATE UNIQUE INDEX sight_label_mart_key ON sight_label_mart (sight_id);

-- The refresher refreshes the marts through this function: REFRESH needs the views' owner (PostgreSQL
-- before 17 has no MAINTAIN privilege), and the service's own user owns nothing. It runs as the owner, in
-- the schema this migration ran in; readers are never blocked (CONCURRENTLY).
CREATE FUNCTION sight_refresh_marts() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    REFRESH MATERIALIZED VIEW CONCURRENTLY sight_city_mart;
    REFRESH MATERIALIZED VIEW CONCURRENTLY sight_label_mart;
$$;
