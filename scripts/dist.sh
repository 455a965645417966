#!/usr/bin/env bash
# make dist: the two artefacts a cluster needs, no install on the nodes.
#
#   dist/pixelmill-<version>-py3-none-any.whl   the pipeline package
#   dist/pixelmill-env.tar.gz                   a relocatable venv (venv-pack) holding the
#                                               wheel and exactly the runtime closure of its pins
#
#   spark-submit --archives dist/pixelmill-env.tar.gz#env \
#       --conf spark.pyspark.python=./env/bin/python ... jobs/train.py ...
#
# How the env is built, and why:
# - It starts as a copy of the tested .venv (same bytes as `make test` ran, Horovod already
#   compiled with Gloo), so nothing is downloaded or compiled again.
# - Every distribution outside the runtime closure of the wheel's requirements is removed
#   (Airflow, pytest, build, venv-pack ...), the editable install is replaced by the wheel
#   (venv-pack refuses editable installs), and `pip check` + an import smoke test must pass.
# - venv-pack does NOT ship the Python interpreter: bin/python is a symlink to the base
#   interpreter, which must exist at the same path on every node (or pass
#   PIXELMILL_PYTHON_PREFIX=/usr to relink it to the nodes' python3.11 prefix).
#
# - Left out of the archive: pyspark/jars (about 440 MB; executors and a cluster-mode driver run
#   on the cluster's own Spark JVM, the env only needs pyspark's Python side; set
#   PIXELMILL_PACK_SPARK_JARS=1 to keep them) and tensorflow/include (headers, only needed to
#   compile Horovod).
#
# Knobs: PIXELMILL_VENV (source venv, default .venv), DIST_DIR (default dist),
# PIXELMILL_DIST_VENV (work copy, default build/dist-venv), PIXELMILL_PACK_LEVEL (gzip 0-9,
# default 1: the archive is mostly compiled .so files, higher levels cost minutes for few MB),
# PIXELMILL_PYTHON_PREFIX (see above).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$(cd "${PIXELMILL_VENV:-$ROOT/.venv}" && pwd)"
PY="$VENV/bin/python"
DIST="${DIST_DIR:-$ROOT/dist}"
WORK="${PIXELMILL_DIST_VENV:-$ROOT/build/dist-venv}"
LEVEL="${PIXELMILL_PACK_LEVEL:-1}"
ARCHIVE="$DIST/pixelmill-env.tar.gz"
log() { printf '[dist] %s\n' "$*" >&2; }
die() { printf 'dist: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ -x "$PY" ] || die "no venv at $VENV: run make setup first"
"$PY" -c 'import build, venv_pack' 2>/dev/null \
    || die "build and venv-pack are missing from $VENV: rerun make setup (they are the [dist] extra)"
mkdir -p "$DIST" "$(dirname "$WORK")"

# --- 1. the wheel ---------------------------------------------------------------
t0="$(now)"
VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
WHEEL="$DIST/pixelmill-$VERSION-py3-none-any.whl"
rm -f "$WHEEL"
# --no-isolation: build with the venv's pinned setuptools instead of downloading one.
"$PY" -m build --wheel --no-isolation --outdir "$DIST" . >"$DIST/build.log" 2>&1 \
    || { tail -20 "$DIST/build.log" >&2; die "wheel build failed (full log: $DIST/build.log)"; }
[ -f "$WHEEL" ] || die "expected $WHEEL after the build; see $DIST/build.log"
rm -rf "$ROOT/build/lib" "$ROOT/build/bdist."* "$ROOT"/*.egg-info
T_WHEEL="$(since "$t0")"
log "wheel $(basename "$WHEEL") in ${T_WHEEL}s"

# --- 2. the runtime env -----------------------------------------------------------
t0="$(now)"
rm -rf "$WORK"
cp -a "$VENV" "$WORK"
rm -f "$WORK/.pixelmill-setup"
# The copy's scripts (shebangs, activate) still name the source venv: point them at the copy,
# so venv-pack relocates them like the rest instead of leaving a path that exists only here.
grep -rlIZ -F "$VENV" "$WORK/bin" | xargs -0 -r sed -i "s#$VENV#$WORK#g"
! grep -rqI -F "$VENV" "$WORK/bin" || die "scripts in $WORK/bin still name $VENV: $(grep -rlI -F "$VENV" "$WORK/bin" | head -3)"
WPY="$WORK/bin/python"
# Work from a neutral folder so `import pipeline` can only find the installed copy.
pushd "$(mktemp -d)" >/dev/null
"$WPY" - "$WHEEL" <<'PYEOF' >"$DIST/removed.txt"
"""Print the distributions outside the runtime closure of the wheel's requirements."""
import importlib.metadata as md
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    roots = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []

installed = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
keep, todo = set(), [Requirement(r) for r in roots]
while todo:
    req = todo.pop()
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    if name in keep:
        continue
    if name not in installed:
        sys.exit(f"runtime requirement {req} is not installed in the source venv: run make setup")
    keep.add(name)
    todo += [Requirement(r) for r in (installed[name].requires or [])]
keep |= {"pip", "setuptools", "wheel"}
for name in sorted(set(installed) - keep):
    print(installed[name].metadata["Name"])
PYEOF
# pixelmill itself is in the list (it is installed editable): the wheel replaces it below.
xargs -r "$WPY" -m pip uninstall -q -y <"$DIST/removed.txt" >/dev/null 2>&1 \
    || die "could not remove dev-only packages from $WORK (list: $DIST/removed.txt)"
"$WPY" -m pip install -q --no-index --no-deps "$WHEEL" || die "could not install $WHEEL into $WORK"
CHECK="$("$WPY" -m pip check 2>&1)" || { printf '%s\n' "$CHECK" >&2; die "pip check failed in the packed env: a runtime dependency is missing"; }
TF_CPP_MIN_LOG_LEVEL=2 "$WPY" - "$WORK" <<'PYEOF' || die "the packed env does not import the stack (see above)"
import importlib.metadata as md
import sys
from pathlib import Path

import horovod.tensorflow as hvd
import pipeline
import pipeline.cli
import pyspark

root = Path(sys.argv[1]).resolve()
assert Path(pipeline.__file__).resolve().is_relative_to(root), f"pipeline imported from {pipeline.__file__}, not {root}"
assert hvd.gloo_built(), "horovod in the packed env was built without Gloo"
assert pyspark.__version__ == md.version("pyspark"), "pyspark files do not match their metadata"
assert not any(d.metadata["Name"].lower().startswith("apache-airflow") for d in md.distributions()), "airflow leaked in"
PYEOF
popd >/dev/null
T_ENV="$(since "$t0")"
log "runtime env $WORK: $(wc -l <"$DIST/removed.txt") dev-only distributions removed, $(du -sh "$WORK" | cut -f1) in ${T_ENV}s"

# --- 3. pack -------------------------------------------------------------------------
t0="$(now)"
PACK_ARGS=(--prefix "$WORK" --output "$ARCHIVE" --force --quiet --compress-level "$LEVEL"
           --exclude "*/site-packages/tensorflow/include/*")
[ "${PIXELMILL_PACK_SPARK_JARS:-0}" = 1 ] || PACK_ARGS+=(--exclude "*/site-packages/pyspark/jars/*")
[ -n "${PIXELMILL_PYTHON_PREFIX:-}" ] && PACK_ARGS+=(--python-prefix "$PIXELMILL_PYTHON_PREFIX")
"$VENV/bin/venv-pack" "${PACK_ARGS[@]}" || die "venv-pack failed for $WORK"
T_PACK="$(since "$t0")"
log "archive $ARCHIVE: $(du -h "$ARCHIVE" | cut -f1) in ${T_PACK}s (gzip level $LEVEL)"

"$PY" - "$WHEEL" "$ARCHIVE" "$WORK" "$T_WHEEL" "$T_ENV" "$T_PACK" "$LEVEL" <<'PYEOF'
import json, os, subprocess, sys
wheel, archive, work, t_wheel, t_env, t_pack, level = sys.argv[1:]
env_bytes = int(subprocess.run(["du", "-sb", work], capture_output=True, text=True).stdout.split()[0])
print(json.dumps({"wheel": wheel, "wheel_bytes": os.path.getsize(wheel), "archive": archive,
                  "archive_bytes": os.path.getsize(archive), "env_bytes": env_bytes,
                  "wheel_s": float(t_wheel), "env_s": float(t_env), "pack_s": float(t_pack),
                  "compress_level": int(level)}))
PYEOF
