"""The FITS frame classifier: telescope frames judged good, mirror wobble or shutter fault as they arrive.

- :mod:`~services.fits_classifier.model`: the ONNX classifier and its contract (class names, threshold,
  preprocessing, all read from the model's metadata);
- :mod:`~services.fits_classifier.verdicts`: frames' bytes -> verdicts (unreadable ones with the reason);
- :mod:`~services.fits_classifier.records`: verdicts in PostgreSQL, once per (checksum, model version);
- :mod:`~services.fits_classifier.annotate` and :mod:`~services.fits_classifier.output`: a copy of each frame
  with its verdict in the header, the original untouched;
- :mod:`~services.fits_classifier.sources` and :mod:`~services.fits_classifier.batch`: files, folders and S3
  prefixes classified in batches;
- :mod:`~services.fits_classifier.commands`: ``tessera fits ...`` and ``tessera worker fits-classifier``.
"""
