#!/usr/bin/env bash
# The README's test command: set up ./.venv and run the whole CPU test suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT/tests"   # run against the installed package, not the source tree

# one pytest-xdist worker per core (LOOKAHEAD_EXT_TEST_WORKERS=0: no workers, one process)
python -m pytest -q -p no:cacheprovider -n "${LOOKAHEAD_EXT_TEST_WORKERS:-auto}" "$@" .
