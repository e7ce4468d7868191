#!/usr/bin/env bash
# The Debian packages the tests need; `make test` runs this before pytest, and so does .ci/run.
#   As root on Debian: installs those that are missing (nothing when all are there).
#   Otherwise, or with --check: exits 1 with one line naming the missing packages (0 when none is).
# A package counts as there when the commands the tests run from it are found: on PATH, or in one of
# $SYSTEM_DEPS_DIRS, the places Debian puts what a user's PATH lacks (nginx, PostgreSQL's binaries).
set -euo pipefail

check_only=0
case "${1:-}" in
  "") ;;
  --check) check_only=1 ;;
  *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac

dirs=${SYSTEM_DEPS_DIRS-/usr/sbin /sbin ${POSTGRES_BIN:-/usr/lib/postgresql/*/bin}}

found() { # found CMD...: every CMD is on PATH or in one of $dirs
  local cmd dir
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 && continue
    for dir in $dirs; do # unquoted on purpose: the list splits, and its globs expand
      [ -x "$dir/$cmd" ] && continue 2
    done
    return 1
  done
}

missing_packages() {
  missing=()
  found curl || missing+=(curl)
  found prometheus promtool || missing+=(prometheus)
  found wrk || missing+=(wrk)
  found nginx || missing+=(nginx)
  found chromium || found chromium-browser || missing+=(chromium)
  found redis-server || missing+=(redis-server)
  found initdb postgres || missing+=(postgresql)
  found tinyproxy || missing+=(tinyproxy)
  found docker-compose || missing+=(docker-compose)
  # Node.js and npm run the official openai Node SDK test. Machines that already have them (often
  # from NodeSource, whose nodejs bundles npm) must not get Debian's npm on top.
  if ! found node || ! found npm; then
    missing+=(nodejs npm)
  fi
}

missing_packages
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$check_only" = 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "tools/system-deps.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  wanted=("${missing[@]}")
  missing_packages
  if [ ${#missing[@]} -eq 0 ]; then
    exit 0
  fi
  echo "tools/system-deps.sh: apt-get installed ${wanted[*]}, but these are still missing: ${missing[*]}" >&2
  exit 1
fi
echo "tools/system-deps.sh: the tests need these Debian packages: ${missing[*]}" \
  "(install them: apt-get install ${missing[*]}, or run this script as root on Debian)" >&2
exit 1
