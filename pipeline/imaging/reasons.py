"""Reject reasons: the documented vocabulary (docs/ingest.md, docs/score.md), one constant each.

Code chooses a reason by what it checked, never by parsing exception text.
"""
from __future__ import annotations

# ingest: per-file checks, in the order they run (pipeline.imaging.clean.clean_image)
BAD_EXTENSION = "bad_extension"
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
ANIMATED = "animated"
CORRUPT = "corrupt"
QUALITY_FLAG = "quality_flag"
# ingest: driver-side checks
FILE_TOO_LARGE = "file_too_large"
#: listed but could not be opened or read (missing, permissions, vanished; an --input-list path that is not there)
UNREADABLE = "unreadable"
NO_LABEL = "no_label"
DUPLICATE = "duplicate"
LABEL_CONFLICT = "label_conflict"
ALREADY_INGESTED = "already_ingested"
NEAR_DUPLICATE = "near_duplicate"
# stored bytes read back (scoring)
WRONG_SIZE = "wrong_size"
WRONG_SHAPE = "wrong_shape"
UNDECODABLE = "undecodable"
