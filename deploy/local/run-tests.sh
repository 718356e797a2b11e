#!/usr/bin/env bash
# `make test`: every tier in one pytest run against the real platform, which this script starts
# if needed and stops again if it started it. Exits non-zero on any failure or on no tests.
set -uo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/with-platform.sh" "$bin" "$bin/python" -m pytest tests -p no:cacheprovider
