#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them all.
#   - a PostgreSQL server on 127.0.0.1:5432 (scripts/ensure-postgres.sh)
#   - a Redis server on 127.0.0.1:6379 (scripts/ensure-redis.sh), for
#     gateways sharing keys' limits
#   - the client compatibility suite's clients, pinned: the official
#     `openai`, `langchain-openai` and `litellm` Python packages in a venv
#     (UNDERSTUDY_PYTHON points at its interpreter) and the official Node
#     `openai` SDK (UNDERSTUDY_NODE_MODULES)
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

# The Python clients of the compatibility suite, pinned (checked by their
# installed versions, so a pin that changes installs again).
venv="$cache/venv"
python_clients=(openai==3.57.0 langchain-openai==1.7.4 litellm==1.110.2)
pinned_check="import importlib.metadata as m, sys
sys.exit(any(m.version(n) != v for n, v in (p.split('==') for p in sys.argv[1:])))"
if ! "$venv/bin/python" -c "$pinned_check" "${python_clients[@]}" >/dev/null 2>&1; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_clients[@]}"
fi
export UNDERSTUDY_PYTHON="$venv/bin/python"

# The official Node `openai` SDK, pinned, for the compatibility suite
# (the tests put UNDERSTUDY_NODE_MODULES on NODE_PATH).
node_dir="$cache/node"
node_openai=7.59.0
if ! grep -qs "\"version\": \"$node_openai\"" "$node_dir/node_modules/openai/package.json"; then
  mkdir -p "$node_dir"
  npm install --silent --no-audit --no-fund --prefix "$node_dir" "openai@$node_openai"
fi
export UNDERSTUDY_NODE_MODULES="$node_dir/node_modules"
export UNDERSTUDY_SLOW_TESTS_CACHE="$cache"
export UNDERSTUDY_TEST_POSTGRES_URL="${UNDERSTUDY_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export UNDERSTUDY_TEST_REDIS_URL="${UNDERSTUDY_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"

cargo test --workspace --locked "$@"

# The autopilot's TREC scenario trains MiniLM several times over real
# sockets: a release build runs it in 3-6 minutes (a debug build, which
# skips it, would take 25-40). CI sets UNDERSTUDY_AUTOPILOT_SCENARIO
# (.ci/run). Its outcome is statistical (random audits, a certificate that
# holds with 95 %), and it has failed by chance in about one run in ten
# (its header keeps the record): a failure runs it once more with another
# order of the traffic, so a loop that is broken, which fails every run,
# still fails the suite.
if [ -n "${UNDERSTUDY_AUTOPILOT_SCENARIO:-}" ]; then
  scenario() { cargo test --release --locked -p understudy-cli --test autopilot_trec -- --nocapture; }
  if ! scenario; then
    seed=$(( ${UNDERSTUDY_AUTOPILOT_SCENARIO_SEED:-0} + 1 ))
    echo "the TREC scenario failed; once more with the traffic shuffled by seed $seed"
    UNDERSTUDY_AUTOPILOT_SCENARIO_SEED=$seed scenario
  fi
fi
