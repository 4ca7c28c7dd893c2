#!/usr/bin/env bash
# Set up and run every test: the Rust core's tests, then pytest (Python, the real model included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
cargo test --release -p saecore
# Run from outside the source tree so the installed package (with its compiled extension) is imported.
cd tests && python3 -m pytest -q -p no:cacheprovider --durations=15 "$@" .
