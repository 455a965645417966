#!/usr/bin/env bash
# One-command, idempotent set-up of the pinned stack into .venv.
#
# - checks for Java >= 17 (installs openjdk-17-jre-headless with apt when root),
# - creates .venv, installs every pin from pyproject.toml in ONE pip command
#   (installing extras later lets pip move protobuf and break TensorFlow),
# - builds Horovod from its sdist with Gloo once and caches the wheel in
#   .cache/wheels so a rerun never compiles again,
# - installs Debian's chromium when root (the report test opens the page in it),
# - verifies that horovod.tensorflow reports Gloo built.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${PIXELMILL_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
WHEELS="$ROOT/.cache/wheels"
STAMP="$VENV/.pixelmill-setup"
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# --- Java -------------------------------------------------------------------
java_major() {
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1
}
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ] 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "Java 17 missing: installing openjdk-17-jre-headless with apt"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    else
        die "Java 17+ is required by Spark 4: install openjdk-17-jre-headless (or set JAVA_HOME) and rerun make setup"
    fi
fi

# --- a headless browser for the report test ----------------------------------
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "chromium missing: installing it with apt (the report test renders the page in it)"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
          || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } \
          || log "warning: could not install chromium; the report's browser tests will fail"
    else
        log "warning: chromium is not installed (apt-get install chromium); the report's browser tests will fail"
    fi
fi

# --- venv -------------------------------------------------------------------
"$PY_BOOT" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 12) else 1)' \
    || die "Python 3.10 or 3.11 is required (TensorFlow 2.18 + Horovod 0.28); set PYTHON=/path/to/python3.11"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$PY" -c 'import horovod.tensorflow as h, sys; sys.exit(0 if h.gloo_built() else 1)' 2>/dev/null; then
    log "environment up to date ($VENV)"
    exit 0
fi

# Every pinned requirement except horovod (it must compile against the TF
# installed here), plus the extras the tests and demo need.
mapfile -t REQS < <("$PY" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(p["dependencies"])
for extra in ("test", "airflow", "dist"):
    reqs += p["optional-dependencies"][extra]
for r in reqs:
    if not r.replace(" ", "").lower().startswith("horovod"):
        print(r)
PYEOF
)
HVD_REQ="$("$PY" -c 'import tomllib; print(next(r for r in tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"] if r.startswith("horovod")))')"
HVD_VER="${HVD_REQ#*==}"

log "installing the pinned stack (${#REQS[@]} requirements, one resolver run)"
"$PY" -m pip install -q --upgrade "pip==25.3" "setuptools<81" wheel
"$PY" -m pip install -q "${REQS[@]}"

TF_VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("tensorflow-cpu"))')"
HVD_DIR="$WHEELS/horovod-$HVD_VER-tf$TF_VER-$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
if ! ls "$HVD_DIR"/horovod-*.whl >/dev/null 2>&1; then
    command -v cmake >/dev/null || die "cmake is required to build Horovod: apt-get install cmake"
    command -v g++ >/dev/null || die "g++ is required to build Horovod: apt-get install g++"
    log "building horovod $HVD_VER against tensorflow $TF_VER with Gloo (about 5 minutes, once)"
    mkdir -p "$HVD_DIR"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir \
        -w "$HVD_DIR" "horovod==$HVD_VER"
else
    log "using cached horovod wheel from $HVD_DIR"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$HVD_DIR"/horovod-*.whl
"$PY" -m pip install -q --no-deps --no-build-isolation -e .

log "verifying"
"$PY" -m pip check >&2 || die "pip check failed: the pins in pyproject.toml no longer agree"
"$PY" - <<'PYEOF' || die "stack verification failed (see above)"
import importlib.metadata as md
import horovod.tensorflow as hvd
import pyspark, tensorflow as tf
assert hvd.gloo_built(), "horovod was built without Gloo"
pb = md.version("protobuf")
assert int(pb.split(".")[0]) < 6, (
    f"protobuf {pb} is installed but TensorFlow 2.18 needs protobuf < 6 (a later pip install moved it): "
    "rerun make setup, which installs every pin in one resolver run")
assert pyspark.__version__ == md.version("pyspark"), (
    f"pyspark files are {pyspark.__version__} but metadata says {md.version('pyspark')}: "
    "pyspark-client overwrote them; uninstall pyspark-client and rerun make setup")
print(f"[setup] ok: pyspark {pyspark.__version__}, tensorflow {tf.__version__}, "
      f"horovod {md.version('horovod')} (gloo), petastorm {md.version('petastorm')}, "
      f"mlflow {md.version('mlflow')}, protobuf {pb}")
PYEOF
echo "$WANT" > "$STAMP"
