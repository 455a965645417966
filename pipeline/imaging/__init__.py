"""One place that validates, decodes and normalises images, for ingest, the loader and scoring.

* :mod:`pipeline.imaging.reasons` - every reject reason, as named constants;
* :mod:`pipeline.imaging.clean` - ingest's per-file work on raw bytes (Pillow): validate,
  normalise the mode, resize, re-encode, pixel sums;
* :mod:`pipeline.imaging.stored` - the stored bytes read back (loader and scoring): the
  header check that guards every decode path against decompression bombs, decoding in
  numpy and in TensorFlow, normalisation.

Heavy imports (Pillow, TensorFlow) happen inside the functions that need them.
"""
