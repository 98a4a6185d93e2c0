# Sourced by the README's commands (scripts/demo.sh, scripts/test.sh): makes ./.venv with torch,
# the project's dependencies and lookahead_ext (editable, the C++ extension built in place),
# then activates it. A re-run with nothing changed takes a second or two: the dependency list
# and the extension's sources are hashed into stamps in .venv/, and pip or the compiler run
# only when a stamp differs (or the built extension is gone).
#
# torch: an importable torch is kept as it is; otherwise ${TORCH_SPEC:-torch==2.13.0} is
# installed (on Linux, PyPI's torch is the CUDA build; for the CPU build set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu). Every later pip call is constrained to
# the torch found, so no dependency can replace it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

_hash() { sha256sum | cut -c1-16; }
# pip without this machine's "WARNING: Location ... is ignored" noise (pipefail keeps pip's status)
_pip() { python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
_stamp_ok() { [ -f ".venv/.stamp-$1" ] && [ "$(cat ".venv/.stamp-$1")" = "$2" ]; }

_torch_version() { python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null; }
if ! _torch_version >/dev/null; then
    _pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "torch==$(_torch_version)" > .venv/.torch-constraint.txt

# timm is left out: it imports torchvision, whose registry builds are CUDA-linked and break a
# CPU torch (tests that need timm skip without it).
DEPS=(setuptools wheel ninja numpy tqdm pytest pytest-xdist hypothesis scikit-learn matplotlib triton
      "transformers==4.57.1" "accelerate==1.15.0" "pytorch-lightning==2.6.6" pytorch_optimizer
      mkdocs-material "mkdocstrings[python]")
deps_key="$(printf '%s\n' "${DEPS[@]}" | cat - .venv/.torch-constraint.txt | _hash)"
if ! _stamp_ok deps "$deps_key"; then
    _pip install -q -c .venv/.torch-constraint.txt "${DEPS[@]}"
    echo "$deps_key" > .venv/.stamp-deps
fi

# The package: an editable install (metadata only, no compile), then the extension in place
# (incremental: ninja reuses build/). Each step re-runs only when its inputs changed.
install_key="$(cat pyproject.toml setup.py | cat - <(echo "$ROOT") | _hash)"
if ! _stamp_ok install "$install_key"; then
    if ! LOOKAHEAD_EXT_NO_CPP=1 python -m pip install -q -c .venv/.torch-constraint.txt \
            --no-build-isolation --no-deps -e . > .venv/install.log 2>&1; then
        cat .venv/install.log >&2; echo "env.sh: pip install -e . failed" >&2; exit 1
    fi
    echo "$install_key" > .venv/.stamp-install
fi
build_key="$(cat pyproject.toml setup.py $(find csrc -type f | LC_ALL=C sort) .venv/.torch-constraint.txt \
             <(env | grep -E '^(LOOKAHEAD_EXT_NO_CUDA|LOOKAHEAD_EXT_NO_CPP|TORCH_CUDA_ARCH_LIST)=' || true) | _hash)"
if [ "${LOOKAHEAD_EXT_NO_CPP:-0}" = 1 ]; then
    rm -f lookahead_ext/_C.*so lookahead_ext/_C_cuda.*so   # the explicit pure-Python opt-out
    rm -f .venv/.stamp-build
elif ! _stamp_ok build "$build_key" || ! ls lookahead_ext/_C.*so >/dev/null 2>&1; then
    echo "env.sh: building the C++ extension (csrc/ changed or not built; 1-3 min)" >&2
    if ! python setup.py build_ext --inplace > .venv/build.log 2>&1; then
        tail -40 .venv/build.log >&2; echo "env.sh: build failed (log: .venv/build.log)" >&2; exit 1
    fi
    echo "$build_key" > .venv/.stamp-build
    (cd / && python -c "import lookahead_ext, sys; print('lookahead_ext', lookahead_ext.__version__, 'backends:', lookahead_ext.ops.available_backends(), file=sys.stderr)")
fi
