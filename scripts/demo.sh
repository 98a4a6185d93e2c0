#!/usr/bin/env bash
# The README's main job: set up ./.venv, then train on scikit-learn's digits with 40% noisy
# labels (SGD, AdamW, SAM, the CMLR family, Lookahead, the baselines; rho tuned on a
# validation split) and write demo.md, demo.json and the figures to results/ (see docs/demo.md).
# Options pass through: scripts/demo.sh --quick | --noise 0 | --out DIR | --help
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m lookahead_ext.demo "$@"
