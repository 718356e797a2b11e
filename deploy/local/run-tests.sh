#!/usr/bin/env bash
# `make test`: every tier in one pytest run against the real platform, which this script starts
# if needed and stops again if it started it. Exits non-zero on any failure or on no tests.
set -uo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
# The real DICOM peers the tests talk to (Orthanc + DICOMweb plugin, dcmtk), from Debian.
"$bin/python" -c 'from deploy.local.orthanc import install; print("dicom peers:", install())' \
    || exit 1
exec "$here/with-platform.sh" "$bin" "$bin/python" -m pytest tests -p no:cacheprovider
