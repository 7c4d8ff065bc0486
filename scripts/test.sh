#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them all.
#   - a PostgreSQL server on 127.0.0.1:5432 (scripts/ensure-postgres.sh)
#   - a Redis server on 127.0.0.1:6379 (scripts/ensure-redis.sh), for
#     gateways sharing keys' limits
#   - the official `openai` Python package in a venv, for the client
#     compatibility test (UNDERSTUDY_PYTHON points at its interpreter)
#   - the real models under $cache/models (UNDERSTUDY_MODELS_DIR)
#   - Debian's Chromium and playwright-core from npm, for the dashboard's
#     browser test (UNDERSTUDY_PLAYWRIGHT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${UNDERSTUDY_CACHE:-$HOME/.cache/understudy}"
mkdir -p "$cache"

bash scripts/ensure-build-deps.sh
bash scripts/ensure-postgres.sh
bash scripts/ensure-redis.sh
# The real models (SmolLM2 GGUF, MiniLM) for the tests that use them.
bash scripts/fetch-models.sh "$cache/models"
export UNDERSTUDY_MODELS_DIR="$cache/models"
bash scripts/ensure-browser.sh "$cache/playwright"
export UNDERSTUDY_PLAYWRIGHT_DIR="$cache/playwright"

venv="$cache/venv"
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40,<4'
fi
export UNDERSTUDY_PYTHON="$venv/bin/python"
export UNDERSTUDY_SLOW_TESTS_CACHE="$cache"
export UNDERSTUDY_TEST_POSTGRES_URL="${UNDERSTUDY_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export UNDERSTUDY_TEST_REDIS_URL="${UNDERSTUDY_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"

cargo test --workspace --locked "$@"
