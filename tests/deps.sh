#!/usr/bin/env bash
# What the tests need beyond a C compiler, make and python3: numpy, for the
# reference implementation and the exporter's quantization. Prints the path
# of a python3 that can import it. Without one: as root, installs Debian's
# python3-numpy with apt-get (as .ci/run does), then prints it; otherwise
# prints the one command to run and exits 1.
#   bash tests/deps.sh     (make test calls it; so does .ci/run)
set -u
find_numpy() {
    local p
    for p in ${PYTHON:-} python3 /usr/bin/python3 python; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import numpy' >/dev/null 2>&1; then
            command -v "$p"
            return 0
        fi
    done
    return 1
}
find_numpy && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the tests need numpy for python3; install it with: sudo apt-get install -y python3-numpy" >&2
    exit 1
fi
echo "tests/deps.sh: installing python3-numpy with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
{ apt-get install -y -qq python3-numpy >/dev/null 2>&1 \
  || { apt-get update -qq >/dev/null && apt-get install -y -qq python3-numpy >/dev/null; }; } \
  || { echo "error: apt-get install python3-numpy failed" >&2; exit 1; }
find_numpy || { echo "error: python3-numpy is installed but no python3 on PATH imports numpy" >&2; exit 1; }
