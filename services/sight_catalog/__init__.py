"""The sight catalog: a city's landmarks collected, labelled, trained on and recognised (SightScan, rebuilt).

The warehouse is PostgreSQL (``migrations/``): cities, sights, images (their encoded bytes in S3), labels
and who drew them, each city's models, and the data marts the refresher reads. Being built; see the
repository's issue tracker for what exists.
"""
