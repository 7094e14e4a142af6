#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu_check.sh needs on a GPU machine that has torch,
# transformers, peft and accelerate but no network. Run it here, where PyPI is reachable:
#
#   bash benchmarks/fetch_wheels.sh          # then carry .whl/ (git-ignored) with the checkout
#
# An explicit list with --no-deps, so that no torch (or other large) build is ever pulled in: TRL and
# what it needs beyond the GPU image (datasets, dill, multiprocess), bitsandbytes (its manylinux
# x86_64 wheel holds the CUDA 11.8-13.x kernels, for QLoRA), deepspeed and its small dependencies (ZeRO-3),
# liger-kernel (step g; pure Python: its Triton comes with the image's CUDA torch), and preftune's small pure
# dependencies. Not carried: vllm (step h: its wheels are ~400 MiB and pin their own torch; the step says
# 'not installed' unless the GPU machine has it) and flash-attn (step c: no PyPI wheel, it builds from source).
# pyarrow, pandas, xxhash, fsspec, matplotlib come with the image (datasets needs them; pyarrow alone
# is ~40 MiB). gpu_check.sh installs only the wheels whose distribution is missing there. The bundle
# must stay under 60 MiB: a copy of the checkout to the GPU machine may be limited to 64 MiB in all.
#
# PY_VERSION (default 3.12, the GPU image's Python) picks the wheels of version-specific packages.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=.whl
LIMIT_MIB=60

WHEELS=(
    trl==1.16.0          # the comparison's other framework (constraints.txt's version)
    datasets==5.2.0      # trl imports it; preftune reads CSV/Parquet through it
    dill==0.4.1          # datasets
    multiprocess==0.70.19  # datasets
    bitsandbytes==0.50.2 # QLoRA (quantization_bit)
    pyyaml==6.0.3        # preftune's configs (the image has it; a fallback)
    tqdm==4.67.1         # preftune, datasets
    safetensors==0.8.0   # preftune's checkpoints
    hjson==3.1.0         # deepspeed (step e3, ZeRO-3)
    py-cpuinfo==9.0.0    # deepspeed
    msgpack==1.2.4       # deepspeed
    ninja==1.13.2        # deepspeed (its ops build at run time)
    einops==0.8.2        # deepspeed
    liger-kernel==0.8.5  # step g, enable_liger_kernel (constraints.txt's version)
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" "${WHEELS[@]}"

# deepspeed is an sdist only: built here into a pure-Python wheel (no ops compiled; it builds what it
# needs at run time), against the torch of this machine without an isolated build environment
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$DEST" deepspeed==0.19.8

ls -l "$DEST"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
size=$(du -sm "$DEST" | cut -f1)
echo "total: $(du -sh "$DEST" | cut -f1) in $DEST ($(ls "$DEST"/*.whl | wc -l) wheels)"
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "ERROR: $DEST is ${size} MiB, over the ${LIMIT_MIB} MiB limit (the checkout travels with it)" >&2
    exit 1
fi
