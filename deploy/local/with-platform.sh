#!/usr/bin/env bash
# Run a command with the local platform up: start it if it is not running, and then stop
# afterwards only what this script started (a developer's running platform is left alone).
# usage: with-platform.sh VENV_BIN COMMAND...
set -uo pipefail
bin=$1; shift
cli="$bin/beeldportaal"

started=no
if ! "$cli" platform status >/dev/null 2>&1; then started=yes; fi
# Platform chatter goes to stderr: the command's stdout (e.g. a benchmark's JSON) stays clean.
cleanup() { if [ "$started" = yes ]; then "$cli" platform down >&2; fi; }
trap cleanup EXIT INT TERM

"$cli" platform up >&2 || exit 1
# Point the command at the platform (settings are read from BEELDPORTAAL_* variables).
set -a; source "$("$bin/python" -c 'from deploy.local.config import LocalConfig as C; print(C.from_env().env_file)')"; set +a
"$@"
