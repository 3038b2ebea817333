"""The sky generator: labelled night-sky images rendered with Stellarium for celestial navigation.

A researcher describes the skies to render in a job file (:mod:`services.sky_generator.job`: where, when
and how the camera looks); the job turns into reproducible frames split into shards, each shard rendered by
one Stellarium process (:mod:`services.sky_generator.stellarium`), and every frame's label (observer and
instant) can be checked against the stars it shows (:mod:`services.sky_generator.geometry`).
"""
