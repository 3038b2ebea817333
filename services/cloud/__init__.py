"""The AWS and database edges the services share: S3 objects, SQS queues, PostgreSQL, the embedded default.

The shared imagery libraries (tiling, inference, geo, scenes) never import this package; service packages
do, at their edges.
"""
