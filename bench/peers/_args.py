"""The command line both ingest peers take (imported by the sibling scripts; stdlib only)."""
from __future__ import annotations

import argparse


def ingest_parser(description: str) -> argparse.ArgumentParser:
    """``--input DIR --output DIR --height H --width W --mode L|RGB``: the job every ingest peer does."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--mode", choices=["L", "RGB"], required=True)
    return p
