#!/usr/bin/env bash
# Opt-in, not run by CI or scripts/env.sh: a venv where the real timm imports with a CPU torch,
# then the timm tests in it. timm imports torchvision, and the torchvision wheels on the package
# index are CUDA-linked (their _C.so needs libtorch_cuda), so torchvision is built here from
# source with its C++ ops for the CPU only (no CUDA, no image or video decoders).
#
#   bash scripts/timm_cpu.sh [VENV]        # default VENV: /tmp/lookahead-timm-venv
#
# The venv is stacked on the project's .venv (made by scripts/env.sh): its torch, lookahead_ext
# (editable) and test dependencies are used as they are; only torchvision and timm are installed
# into VENV, with --no-deps (so nothing can replace the CPU torch). The torchvision source is
# TORCHVISION_SRC (a source folder or a .tar.gz) if set, else Debian's source package of the
# same version (the upstream tarball, checked against its SHA-256; fetched with apt-get from the
# Debian mirror this machine already uses), else a git clone of the release tag.
# Time: the torchvision build is the cost (docs/training.md, timm): its C++ ops took 54 min on
# 2 loaded cores with MAX_JOBS=1 (set MAX_JOBS to use more), then its image extension builds
# (not timed here); a second run reuses the venv and the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/lookahead-timm-venv}"
TV_VERSION=0.21.0          # torchvision: the newest release whose source Debian ships here
TV_SHA256=0a4a967bbb7f9810f792cd0289a07fb98c8fb5d1303fae8b63e3a6b05d720058
TIMM_VERSION=1.0.31
WORK="${TIMM_CPU_WORK:-/tmp/lookahead-timm-build}"
PROJECT_PY="$ROOT/.venv/bin/python"
[ -x "$PROJECT_PY" ] || { echo "timm_cpu.sh: run scripts/env.sh first (no $ROOT/.venv)" >&2; exit 1; }
mkdir -p "$WORK"
SECONDS=0

# 1. the venv, stacked on the project's (site.addsitedir also runs that venv's .pth files)
if [ ! -x "$VENV/bin/python" ]; then
    "$(readlink -f "$PROJECT_PY")" -m venv "$VENV"
fi
site_of() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
echo "import site; site.addsitedir('$(site_of "$PROJECT_PY")')" > "$(site_of "$VENV/bin/python")/lookahead_project.pth"
PY="$VENV/bin/python"
"$PY" -c "import torch, lookahead_ext; print('timm_cpu.sh: torch', torch.__version__)"

# 2. torchvision's source
src_dir() { find "$WORK/src" -mindepth 1 -maxdepth 1 -type d | head -1; }
if [ ! -f "$WORK/src/.done" ]; then
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    if [ -n "${TORCHVISION_SRC:-}" ] && [ -d "$TORCHVISION_SRC" ]; then
        cp -a "$TORCHVISION_SRC" "$WORK/src/"
    elif [ -n "${TORCHVISION_SRC:-}" ]; then
        tar -xzf "$TORCHVISION_SRC" -C "$WORK/src"
    elif command -v apt-get >/dev/null; then
        # a private apt state: deb-src for Debian 13 on the mirror of the machine's own sources
        uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
        [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 ~ /^http/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
        apt="$WORK/apt"
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$apt/src.list"
        opts=(-o Dir::Etc::SourceList="$apt/src.list" -o Dir::Etc::SourceParts=/nonexistent
              -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache")
        apt-get "${opts[@]}" -qq update
        # the .orig tarball is the upstream release; Debian's packaging files are not needed
        (cd "$apt" && apt-get "${opts[@]}" source --download-only "pytorch-vision=$TV_VERSION-3" || true)
        echo "$TV_SHA256  $apt/pytorch-vision_$TV_VERSION.orig.tar.gz" | sha256sum -c -
        tar -xzf "$apt/pytorch-vision_$TV_VERSION.orig.tar.gz" -C "$WORK/src"
    else
        git clone -q --depth 1 --branch "v$TV_VERSION" https://github.com/pytorch/vision "$WORK/src/vision"
    fi
    [ "$(cat "$(src_dir)/version.txt")" = "$TV_VERSION" ] || { echo "timm_cpu.sh: not torchvision $TV_VERSION" >&2; exit 1; }
    touch "$WORK/src/.done"
fi

# 3. torchvision built against the project's CPU torch: C++ ops only (CPU kernels, autograd,
# autocast, quantized), no CUDA, no image/video decoders; no build isolation, no dependencies
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps setuptools wheel
    (cd "$(src_dir)" && env FORCE_CUDA=0 FORCE_MPS=0 TORCHVISION_USE_PNG=0 TORCHVISION_USE_JPEG=0 \
        TORCHVISION_USE_WEBP=0 TORCHVISION_USE_NVJPEG=0 TORCHVISION_USE_VIDEO_CODEC=0 \
        TORCHVISION_USE_FFMPEG=0 CUDA_HOME= MAX_JOBS="${MAX_JOBS:-1}" BUILD_VERSION="$TV_VERSION+cpu.src" \
        nice -n "${NICE:-19}" "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheel" .)
    "$PY" -m pip install -q --no-deps "$WORK/wheel/torchvision-$TV_VERSION+cpu.src-"*.whl
fi

# 4. timm itself (its other dependencies come with the project's transformers)
"$PY" -m pip install -q --no-deps "timm==$TIMM_VERSION"
"$PY" -c "import timm, timm.optim, timm.data, torchvision as tv, torch
print('timm_cpu.sh: timm', timm.__version__, 'torchvision', tv.__version__, 'torch', torch.__version__,
      'nms op:', torch.ops.torchvision.nms is not None)"
echo "timm_cpu.sh: venv ready in ${SECONDS}s: $VENV"

# 5. the timm tests (one thread: two threads on a busy 2-core machine run ~20x slower)
cd "$ROOT/tests"
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider test_integrations_timm.py test_integrations_factory.py
