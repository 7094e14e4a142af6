#!/usr/bin/env bash
# Every GPU check in one run (benchmarks/gpu_check.py says which), fitted to about 7.5 minutes on one
# H100/H200, with a markdown report: $OUT/gpu_check.md when OUT is set, else benchmarks/_work/gpu_check.md.
#
#   bash benchmarks/fetch_wheels.sh            # first, on a machine with PyPI: wheels into .whl/ (~50 MiB)
#   bash benchmarks/gpu_check.sh               # then on the GPU machine (no network needed), from the repo root
#   bash benchmarks/gpu_check.sh --smoke       # here, on CPU: tiny sizes, a few minutes (automatic without CUDA)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --smoke --steps a1,b   # other flags go to gpu_check.py
#
# Set-up, without network and without ever pulling another torch: wheels in .whl/ whose distribution is
# not installed (or, for trl, not at the wheel's version) are installed with
# `pip install --no-index --no-deps --find-links .whl --target $SITE` and put on PYTHONPATH; preftune is
# used from this checkout (PYTHONPATH), installed with `pip install --no-deps -e .` where it is not
# importable otherwise. In smoke mode nothing that imports is reinstalled, and preftune is not installed.
#
# The body is one function, read whole before it runs: editing this file during a run cannot break it.
set -u

main() {
START=$(date +%s)
export GPU_CHECK_COMMAND="${PYTHON:+PYTHON=$PYTHON }bash benchmarks/gpu_check.sh${*:+ $*}"  # for the report
PYTHON=${PYTHON:-python3}
case $PYTHON in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # a path stays valid
cd "$(dirname "$0")/.."
ROOT=$PWD
SITE=${SITE:-/tmp/preftune-gpu-check-site}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

ARGS=("$@")
SMOKE=0
for a in "$@"; do [ "$a" = --smoke ] && SMOKE=1; done
if [ "$SMOKE" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "[gpu_check] no CUDA device visible to $PYTHON: smoke mode (CPU, tiny sizes)"
    SMOKE=1
    ARGS+=(--smoke)
fi

if [ -n "${OUT:-}" ]; then  # keep the whole console output too (a remote runner collects what is under $OUT)
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check_console.log") 2>&1
fi

# --- wheels ---------------------------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    mapfile -t WANTED < <("$PYTHON" - <<'EOF'
import importlib.metadata as md, pathlib, re
pinned = {"trl"}  # the comparison is against this TRL version: install it over another one
for whl in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    dist = re.sub(r"[-_.]+", "-", name).lower()
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have is None or (dist in pinned and have != version):
        print(whl)
EOF
)
    if [ "${#WANTED[@]}" -gt 0 ]; then
        echo "[gpu_check] installing ${#WANTED[@]} wheel(s) from .whl/ into $SITE: ${WANTED[*]##*/}"
        PIP=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check
             --upgrade --find-links .whl --target "$SITE")
        if ! "${PIP[@]}" "${WANTED[@]}"; then  # one bad wheel (another Python's tag, say) must not stop the rest
            echo "[gpu_check] WARNING: the wheels did not install together; one at a time:"
            for whl in "${WANTED[@]}"; do
                "${PIP[@]}" "$whl" || echo "[gpu_check] WARNING: ${whl##*/} did not install; steps needing it will fail"
            done
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "[gpu_check] every wheel in .whl/ is installed already"
    fi
elif [ "$SMOKE" = 0 ]; then
    echo "[gpu_check] WARNING: no .whl/ folder (run benchmarks/fetch_wheels.sh where PyPI is reachable and carry"
    echo "            .whl): trl, datasets and bitsandbytes must already be installed"
fi

# --- preftune itself --------------------------------------------------------------------------------
if [ "$SMOKE" = 0 ] && ! (cd / && "$PYTHON" -c 'import preftune' 2>/dev/null); then  # from /: not the checkout
    echo "[gpu_check] installing preftune (pip install --no-deps -e .)"
    if ! log=$("$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-index \
            -e . 2>&1); then
        echo "[gpu_check] (the editable install failed: $(grep -i 'error' <<<"$log" | tail -1); preftune runs from"
        echo "            the checkout through PYTHONPATH, which is all the steps need)"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" benchmarks/gpu_check.py --start "$START" --python "$PYTHON" "${ARGS[@]}"
}

main "$@"
exit $?
