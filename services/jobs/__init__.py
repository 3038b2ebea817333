"""What the queue-fed services share: versioned JSON documents checked with JSON paths
(:mod:`~services.jobs.documents`), CloudWatch embedded-metric records (:mod:`~services.jobs.emf`) and the
worker loop around a queue (:mod:`~services.jobs.queue_worker`). No service logic lives here."""
