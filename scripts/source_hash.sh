#!/usr/bin/env bash
# Prints a hash of what the extension is built from (csrc/ and setup.py, in DIR, by default this
# checkout), so that a library built elsewhere (scripts/gpu_prebuild.sh) is used only by the
# sources it was built from.
#   scripts/source_hash.sh [DIR]
cd "${1:-$(dirname "$0")/..}" && find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16
