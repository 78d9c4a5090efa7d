#!/usr/bin/env bash
# Install the services that the integration tests start themselves on
# loopback, from Debian: redis-server (cache / shared rate limits),
# prometheus + promtool (scrape + alert-rule tests), chromium (the status-page
# test drives it through playwright's executable_path; playwright's own browser
# download is not reachable here). Never starts anything.
set -u
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} (Debian packages) for the integration tests ..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null 2>&1 \
    || echo "warning: could not install ${need[*]}; the tests that need them will be skipped with a reason" >&2
else
  echo "note: ${need[*]} not found (apt-get install ${need[*]}); the tests that need them will be skipped with a reason" >&2
fi
exit 0
