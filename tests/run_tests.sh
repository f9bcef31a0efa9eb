#!/usr/bin/env bash
# Runs every test program in tests/ and sums their results.
# Protocol: each program prints one line per check, "ok NAME" or
# "FAIL NAME: why" (or "skip NAME: why", only outside CI when a file from
# ../shared is missing). A program that exits non-zero without printing a
# FAIL line counts as one failure. The last line is "N passed, N failed".
# Environment: RUN (engine binary), PYTHON (an interpreter with numpy),
# SHARED (../shared), TMPDIR_TESTS (scratch folder), CI.
set -u
cd "$(dirname "$0")/.."
: "${RUN:=./run}" "${PYTHON:=python3}" "${SHARED:=../shared}"
export RUN PYTHON SHARED
export TMPDIR_TESTS="${TMPDIR_TESTS:-$(mktemp -d)}"
only="${1:-}"
passed=0 failed=0 skipped=0
run_one() { # name, command...
    local name=$1; shift
    local out rc t0=$SECONDS
    out=$("$@" 2>&1); rc=$?
    local p f s
    p=$(grep -c '^ok ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out"); s=$(grep -c '^skip ' <<<"$out")
    grep -E '^(FAIL|skip) ' <<<"$out"
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $name: exited with status $rc"; tail -n 5 <<<"$out" | sed 's/^/    /'
        f=1
    fi
    printf '%-34s %4d passed, %d failed%s (%d s)\n' "$name" "$p" "$f" "$([ "$s" -gt 0 ] && echo ", $s skipped")" $((SECONDS - t0))
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
}
for t in tests/test_*; do
    name=$(basename "$t")
    [ -n "$only" ] && [[ "$name" != *"$only"* ]] && continue
    case "$t" in
        *.py) run_one "$name" "$PYTHON" "$t" ;;
        *.sh) run_one "$name" bash "$t" ;;
        *.c|*.h|*.o|*.d) ;;
        *) [ -x "$t" ] && run_one "$name" "$t" ;;
    esac
done
rm -rf "$TMPDIR_TESTS"
if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"; else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
