#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth and
# a database named `test`, installing it from Debian's packages if needed.
# The store's and gateway's test suites run against it.
set -euo pipefail

if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  :
else
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "installing PostgreSQL from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # Trust connections from this machine only: the tests use no password.
  if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    sed -i -E 's/^(local|host)(\s+all\s+all.*)\s(peer|scram-sha-256|md5)$/\1\2 trust/' "$hba"
    grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba" || echo "host all all 127.0.0.1/32 trust" >> "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 1
  done
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
fi

if ! psql -h 127.0.0.1 -U postgres -d test -tAc 'select 1' >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -tAc 'CREATE DATABASE test' >/dev/null
fi
echo "postgres ready on 127.0.0.1:5432 (database test)" >&2
