#!/usr/bin/env bash
# The kernels' Arm NEON paths against their scalar references: test_engine
# built for Armv8.2-A + dotprod (tests/engine_neon, which make test builds
# where aarch64-linux-gnu-gcc is installed), run under qemu-aarch64. Its
# checks keep their names, prefixed neon_. Without the cross tools: a skip
# line, or under CI (whose .ci/run installs them) a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=tests/engine_neon
if [ "$(uname -m)" = aarch64 ]; then
    echo "skip engine_neon: this is an Arm machine; the native test_engine runs the NEON paths"
    exit 0
fi
if ! [ -x "$bin" ] || ! command -v qemu-aarch64 >/dev/null; then
    why="$bin or qemu-aarch64 missing (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user, then make test)"
    if [ "${CI:-}" = true ]; then echo "FAIL engine_neon: $why"; exit 1; fi
    echo "skip engine_neon: $why"
    exit 0
fi
qemu-aarch64 "$bin" | sed -E 's/^(ok|FAIL) /\1 neon_/'
