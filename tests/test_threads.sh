#!/usr/bin/env bash
# Same greedy tokens whatever the thread count, and with the OpenMP build
# (hidden_dim 340: the FFN rows end in a short group of 20).
set -u
RUN=${RUN:-./run}; PY=${PYTHON:-python3}; TMP=${TMPDIR_TESTS:-/tmp}
for dtype in f32 q8_0 q4_0; do
    model=$TMP/threads_$dtype.bin
    "$PY" export/export.py "$model" --random --dim 128 --hidden-dim 340 --n-layers 2 --n-heads 8 --n-kv-heads 2 \
        --vocab-size 1000 --max-seq-len 256 --dtype $dtype --seed 5 >/dev/null 2>&1 \
        || { echo "FAIL threads_setup_$dtype: export failed"; continue; }
    prompt="The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up."
    ref=$("$RUN" "$model" -i "$prompt" -n 120 -t 0 -T 1 2>/dev/null | od -c | md5sum)
    for T in 2 3; do
        got=$("$RUN" "$model" -i "$prompt" -n 120 -t 0 -T $T 2>/dev/null | od -c | md5sum)
        [ "$got" = "$ref" ] && echo "ok greedy_${dtype}_T1_equals_T$T" || echo "FAIL greedy_${dtype}_T1_equals_T$T: outputs differ"
    done
    if [ -x ./run-omp ]; then
        got=$(./run-omp "$model" -i "$prompt" -n 120 -t 0 -T 2 2>/dev/null | od -c | md5sum)
        [ "$got" = "$ref" ] && echo "ok openmp_build_gives_the_same_${dtype}_tokens" \
            || echo "FAIL openmp_build_gives_the_same_${dtype}_tokens: outputs differ"
    fi
done
