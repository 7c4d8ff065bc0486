#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379, installing it from
# Debian's packages if needed. The gateway's shared-limits test (two
# gateways counting one key's limits through it) runs against it.
set -euo pipefail

if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  :
else
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing Redis from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server >/dev/null
  fi
  # Loopback only, no snapshots: the tests need a counter, not a database.
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 1 30); do
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && break
    sleep 1
  done
fi
echo "redis ready on 127.0.0.1:6379" >&2
