"""What the peer scripts share: the ingest peers' command line and a local Ray run (stdlib only at import)."""
from __future__ import annotations

import argparse
import json
from typing import Callable


def ingest_parser(description: str) -> argparse.ArgumentParser:
    """``--input DIR --output DIR --height H --width W --mode L|RGB``: the job every ingest peer does."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--mode", choices=["L", "RGB"], required=True)
    return p


def on_local_ray(cpus: int, job: Callable[[], None]) -> int:
    """Run ``job`` on a local Ray of ``cpus`` CPUs (no dashboard, loopback only), shut it down, print the peer line."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        job()
    finally:
        ray.shutdown()
    print(json.dumps({"peer": "ray", "version": ray.__version__}), flush=True)
    return 0
