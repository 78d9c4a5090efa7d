#!/usr/bin/env bash
# Install the services that the integration tests start themselves on
# loopback (today: redis-server, from Debian). Never starts anything.
set -u
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (Debian package) for the Redis cache tests ..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; } >/dev/null 2>&1 \
    || echo "warning: could not install redis-server; the Redis cache tests will be skipped" >&2
else
  echo "note: redis-server not found (apt-get install redis-server); the Redis cache tests will be skipped" >&2
fi
exit 0
