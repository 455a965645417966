"""The run report's "Data quality" section: flag counts, near-duplicate groups and leaks, and
thumbnails a person can judge (from the ingest manifest's ``quality`` block and
``_quality_examples.json``, both written by :mod:`pipeline.ingest.quality`)."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, List, Mapping

from pipeline.contracts import QUALITY_EXAMPLES
from pipeline.fs import filesystem, join, to_uri
from pipeline.imaging.quality import FLAGS

#: Checks, once the page has loaded, that every image decoded; a headless browser reads the result
#: from the body's data attributes (tests/test_quality.py).
IMAGES_CHECK = (
    "<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
    "document.body.setAttribute('data-images-total',im.length);"
    "document.body.setAttribute('data-images-loaded',ok);});</script>"
)


def read_examples(ingest_dir: str) -> Dict[str, Any]:
    """The thumbnails of the ingest output's newest committed version (or of a version folder)."""
    from pipeline.contracts import resolve_ingest

    uri = to_uri(ingest_dir)
    fs = filesystem(uri)
    path = join(resolve_ingest(uri, fs).root, QUALITY_EXAMPLES)
    return fs.read_json(path) if fs.exists(path) else {}


def _figure(out_dir: Path, name: str, ex: Mapping[str, Any]) -> str:
    (out_dir / name).write_bytes(base64.b64decode(ex["png"]))
    caption = f"{ex.get('split')}: {str(ex.get('source_path', '')).rsplit('/', 1)[-1]}"
    return (f"<figure><img src='quality/{html.escape(name)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def section(manifest: Mapping[str, Any], examples: Mapping[str, Any], out_dir: Path) -> str:
    """HTML of the section; the thumbnails are written as PNGs under ``out_dir/quality/``."""
    q = manifest.get("quality")
    if not q:
        return "<h2>Data quality</h2><p>This ingest output has no quality block (written before it existed).</p>"
    shots = Path(out_dir) / "quality"
    shots.mkdir(parents=True, exist_ok=True)
    flags = q.get("flags") or {}
    splits = sorted(set(flags) | set(manifest.get("splits") or {}))
    head = "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    rows = "".join(f"<tr><td>{f}</td>" + "".join(f"<td>{(flags.get(s) or {}).get(f, 0):,}</td>" for s in splits)
                   + "</tr>" for f in FLAGS)
    parts: List[str] = ["<h2>Data quality</h2>",
                        f"<table><thead><tr><th>flag</th>{head}</tr></thead><tbody>{rows}</tbody></table>"]
    near = q.get("near_duplicates") or {}
    if near.get("policy", "off") == "off":
        parts.append("<p>Near-duplicates were not looked for (<code>ingest.near_duplicates: off</code>).</p>")
    else:
        cross = near.get("cross_split_groups") or {}
        leaked = near.get("leaked_images") or {}
        verdict = ("no near-duplicate group crosses splits" if not cross else
                   "leaks: " + ", ".join(f"{n:,} groups across {k}" for k, n in cross.items())
                   + " (" + ", ".join(f"{n:,} {s} images" for s, n in leaked.items()) + ")")
        parts.append(
            f"<p>Near-duplicates (pHash within Hamming distance {near.get('distance')}, policy "
            f"<code>{html.escape(str(near.get('policy')))}</code>): {near.get('images_in_groups', 0):,} images in "
            f"{near.get('groups', 0):,} groups (largest {near.get('largest_group', 0):,}); moved "
            f"{near.get('moved', 0):,}, rejected {near.get('rejected', 0):,}; <b>{html.escape(verdict)}</b>."
            + (f" {near.get('oversized_groups'):,} groups larger than {near.get('max_group')} were left alone."
               if near.get("oversized_groups") else "") + "</p>")
    figs: List[str] = []
    for flag, shown in (examples.get("flags") or {}).items():
        cells = "".join(_figure(shots, f"{flag}_{i}.png", ex) for i, ex in enumerate(shown))
        figs.append(f"<h3>{html.escape(flag)}</h3><div class='thumbs'>{cells}</div>")
    pairs = examples.get("near_duplicate_pairs") or []
    if pairs:
        figs.append("<h3>near-duplicate pairs</h3>")
        for i, pair in enumerate(pairs):
            cells = "".join(_figure(shots, f"pair_{i}_{j}.png", ex) for j, ex in enumerate(pair))
            figs.append(f"<div class='thumbs pair'>{cells}</div>")
    return "\n".join(parts + figs)
