#!/usr/bin/env bash
# Makes sure the dashboard's browser tests can run: Debian's Chromium at
# /usr/bin/chromium (never a downloaded browser), and playwright-core from
# npm in a folder of its own (argument 1), which the tests find through
# UNDERSTUDY_PLAYWRIGHT_DIR.
set -euo pipefail

dir="$1"
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Chromium from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
# The version the tests were written against; its own browser download is
# never used (the tests pass executablePath).
version="1.65.1"
if [ "$(node -p "require('$dir/node_modules/playwright-core/package.json').version" 2>/dev/null)" != "$version" ]; then
  mkdir -p "$dir"
  [ -f "$dir/package.json" ] || echo '{"private": true}' > "$dir/package.json"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$dir" --no-audit --no-fund --silent "playwright-core@$version" >&2
fi
echo "browser tests ready: /usr/bin/chromium, playwright-core $version in $dir" >&2
