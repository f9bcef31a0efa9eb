#!/usr/bin/env bash
# Runs each libFuzzer harness for a bounded time (make fuzz; FUZZ_SECONDS, default 60)
# and prints, per harness, the executions, exec/s and coverage (cov:, ft:) reached.
# Usage: bash tests/fuzz/run_fuzz.sh [SECONDS] [HARNESS...]   (from the repo root)
# The committed seeds (tests/fuzz/corpus_*) are read, never written: new inputs
# go to tests/fuzz/build/corpus_*, crashes to tests/fuzz/build/crash-*. A crash
# fails the run; once fixed, copy its input to tests/fuzz/regressions/loader/ (a model
# file: tests/test_malformed.py runs the engine on it) or .../tokenizer/ (tests/test_fuzz_replay
# runs the harness's checks on it), so `make test` keeps it fixed.
set -u
cd "$(dirname "$0")/../.."
secs=${1:-${FUZZ_SECONDS:-60}}; shift || true
harnesses=("$@"); [ ${#harnesses[@]} -gt 0 ] || harnesses=(loader tokenizer)
PY=${PYTHON:-python3}; SHARED=${SHARED:-../shared}
build=tests/fuzz/build
mkdir -p "$build"

# The tokenizer harness's vocabularies: tok512 (in the repo) and Llama 3's (../shared, if there)
[ -s "$build/tok512.tok" ] || "$PY" export/tokenizer_section.py models/tok512.bin "$build/tok512.tok" >/dev/null \
    || { echo "error: cannot write $build/tok512.tok"; exit 1; }
if [ ! -s "$build/llama3.tok" ] && [ -f "$SHARED/models/llama3-tokenizer.json" ]; then
    "$PY" export/tokenizer_section.py "$SHARED/models/llama3-tokenizer.json" "$build/llama3.tok" >/dev/null \
        || { echo "error: cannot write $build/llama3.tok"; exit 1; }
fi
[ -s "$build/llama3.tok" ] || echo "note: no $SHARED/models/llama3-tokenizer.json: the tokenizer harness uses its small built-in Llama 3 vocabulary"
export FUZZ_LLAMA2C_TOK=$build/tok512.tok FUZZ_LLAMA3_TOK=$build/llama3.tok

status=0
summary=()
for h in "${harnesses[@]}"; do
    bin=tests/fuzz/fuzz_$h
    [ -x "$bin" ] || { echo "error: $bin is not built (make fuzz builds it with clang)"; exit 1; }
    work=$build/corpus_$h
    mkdir -p "$work"
    log=$build/fuzz_$h.log
    # -close_fd_mask=2: the loader prints one "error: ..." line per rejected file; libFuzzer's
    # own report (and a sanitizer's) still reach the terminal through a saved descriptor.
    extra=(); [ "$h" = loader ] && extra=(-close_fd_mask=2)
    echo "fuzz_$h: ${secs}s ..."
    "$bin" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$build/crash-$h-" "${extra[@]}" "$work" "tests/fuzz/corpus_$h" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    if [ $rc -ne 0 ]; then
        status=1
        echo "FAIL fuzz_$h: exit status $rc; see $log and $build/crash-$h-*"
        grep -E 'ERROR|SUMMARY|fuzz_tokenizer:|Test unit written' "$log" | head -5 | sed 's/^/    /'
    fi
    summary+=("$(printf 'fuzz_%-10s %4ss %10s execs %7s exec/s   %s%s' "$h" "$secs" "${execs:-?}" "${rate:-?}" \
        "${cov:-cov: ?}" "$([ $rc -ne 0 ] && echo '   CRASH')")")
done
printf '%s\n' "${summary[@]}"
exit $status
