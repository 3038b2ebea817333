-- A labelling says how it ended: DONE (the labeller looked; boxes may be 0) or REJECTED (the labeller
-- refused the image: not decodable, too large for the API...) with the reason, so a refused image is not
-- sent again (and paid for again) every round, and an operator can see why.
ALTER TABLE sight_labellings
    ADD COLUMN status text NOT NULL DEFAULT 'DONE' CHECK (status IN ('DONE', 'REJECTED')),
    ADD COLUMN reason text,
    ADD CONSTRAINT sight_labellings_reason CHECK ((status = 'REJECTED') = (reason IS NOT NULL));
