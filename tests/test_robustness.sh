#!/usr/bin/env bash
# Inputs the engine must survive: bad flags (beyond test_cli.sh), invalid UTF-8
# prompts, allocations too big to succeed, context sizes whose index products
# pass 2^31, closed pipes and full disks. Each either works or ends with exit
# status 1 and one exact "error: ..." line; never a crash, a hang or a
# sanitizer report.
set -u
RUN=${RUN:-./run}; PY=${PYTHON:-python3}; TMP=${TMPDIR_TESTS:-/tmp}/robustness
mkdir -p "$TMP"
export_model() { # path, export.py args...
    local out=$1; shift
    "$PY" export/export.py "$out" "$@" >/dev/null 2>&1 || { echo "FAIL robustness_setup: cannot export $out"; exit 1; }
}
tiny=$TMP/tiny.l3ck    # llama3 kind: ids 0..255 are the bytes, 256 BOS, chat specials; no merges
stories=$TMP/stories.l3ck
export_model "$tiny" --random --dim 32 --hidden-dim 32 --n-layers 1 --n-heads 2 --n-kv-heads 1 --vocab-size 261 --max-seq-len 64
export_model "$stories" --llama2c models/stories260K.bin --tokenizer models/tok512.bin

# Sanitizer runtimes may add their own notice of a failed huge allocation; it is not the engine's output.
san_notice='^==[0-9]+==WARNING: (Address|Thread|Memory)Sanitizer failed to allocate'

# expect_error NAME EXPECTED_STDERR_LINE -- ARGS...: status 1 and that line is all of stderr
expect_error() {
    local name=$1 want=$2; shift 3
    local err rc
    err=$("$RUN" "$@" 2>&1 >/dev/null </dev/null); rc=$?
    err=$(grep -Ev "$san_notice" <<<"$err")
    if [ "$rc" -eq 1 ] && [ "$err" = "$want" ]; then echo "ok $name"
    else echo "FAIL $name: status $rc, stderr '$(head -c 300 <<<"$err")', expected '$want'"; fi
}

# expect_usage NAME EXPECTED_FIRST_LINE -- ARGS...: status 1, the error, then the usage
expect_usage() {
    local name=$1 want=$2; shift 3
    local err rc
    err=$("$RUN" "$@" 2>&1 >/dev/null </dev/null); rc=$?
    local first=${err%%$'\n'*} second
    second=$(sed -n 2p <<<"$err")
    if [ "$rc" -eq 1 ] && [ "$first" = "$want" ] && [[ "$second" == usage:* ]]; then echo "ok $name"
    else echo "FAIL $name: status $rc, stderr '$first' / '$second', expected '$want' then the usage"; fi
}

# ---------------------------------------------------------------------------
# Flags: strict numbers (the whole argument, in range), unknown flags, missing values

expect_error temperature_nan_is_rejected "error: -t expects a number in [0, 1e+06], got 'nan'" -- "$tiny" -t nan
expect_error temperature_inf_is_rejected "error: -t expects a number in [0, 1e+06], got 'inf'" -- "$tiny" -t inf
expect_error temperature_overflow_is_rejected "error: -t expects a number in [0, 1e+06], got '1e99'" -- "$tiny" -t 1e99
expect_error temperature_above_range_is_rejected "error: -t expects a number in [0, 1e+06], got '1e7'" -- "$tiny" -t 1e7
expect_error temperature_trailing_junk_is_rejected "error: -t expects a number in [0, 1e+06], got '0.5x'" -- "$tiny" -t 0.5x
expect_error temperature_empty_is_rejected "error: -t expects a number in [0, 1e+06], got ''" -- "$tiny" -t ""
expect_error topp_negative_is_rejected "error: -p expects a number in [0, 1], got '-0.1'" -- "$tiny" -p -0.1
expect_error topp_nan_is_rejected "error: -p expects a number in [0, 1], got 'nan'" -- "$tiny" -p nan
expect_error topp_just_above_one_is_rejected "error: -p expects a number in [0, 1], got '1.0001'" -- "$tiny" -p 1.0001
expect_error threads_above_range_is_rejected "error: -T expects an integer in [1, 1024], got '1025'" -- "$tiny" -T 1025
expect_error threads_negative_is_rejected "error: -T expects an integer in [1, 1024], got '-1'" -- "$tiny" -T -1
expect_error threads_fraction_is_rejected "error: -T expects an integer in [1, 1024], got '1.5'" -- "$tiny" -T 1.5
expect_error steps_above_int_is_rejected "error: -n expects an integer in [0, 2147483647], got '2147483648'" -- "$tiny" -n 2147483648
expect_error steps_overflow_is_rejected "error: -n expects an integer in [0, 2147483647], got '99999999999999999999'" -- "$tiny" -n 99999999999999999999
expect_error steps_hex_is_rejected "error: -n expects an integer in [0, 2147483647], got '0x10'" -- "$tiny" -n 0x10
expect_error context_zero_is_rejected "error: -c expects an integer in [1, 2147483647], got '0'" -- "$tiny" -c 0
expect_error context_negative_is_rejected "error: -c expects an integer in [1, 2147483647], got '-1'" -- "$tiny" -c -1
expect_error context_one_past_model_is_rejected "error: -c 65 exceeds the model's maximum context of 64" -- "$tiny" -c 65
expect_error seed_negative_is_rejected "error: -s expects an integer in [0, 9223372036854775807], got '-1'" -- "$tiny" -s -1
expect_error seed_overflow_is_rejected "error: -s expects an integer in [0, 9223372036854775807], got '18446744073709551616'" -- "$tiny" -s 18446744073709551616
expect_error kv_heads_zero_is_rejected "error: --kv-heads expects an integer in [1, 1024], got '0'" -- "$tiny" --kv-heads 0
expect_error kv_heads_not_a_number_is_rejected "error: --kv-heads expects an integer in [1, 1024], got 'two'" -- "$tiny" --kv-heads two
expect_usage dash_alone_is_an_unknown_option "error: unknown option '-'" -- "$tiny" -
expect_usage double_dash_is_an_unknown_option "error: unknown option '--'" -- "$tiny" --
expect_usage glued_flag_value_is_an_unknown_option "error: unknown option '-n5'" -- "$tiny" -n5
expect_usage unknown_flag_prints_the_usage "error: unknown option '-x'" -- "$tiny" -x 1
expect_usage missing_value_prints_the_usage "error: option -c needs a value" -- "$tiny" -i hi -c
expect_usage missing_kv_heads_value_prints_the_usage "error: option --kv-heads needs a value" -- "$tiny" --kv-heads
expect_usage empty_mode_is_rejected "error: unknown mode '' (generate, chat, ppl, tokenize, info, kv)" -- "$tiny" -m ""
expect_error model_is_a_directory "error: $TMP: not a regular file" -- "$TMP"
expect_error model_is_a_device "error: /dev/null: not a regular file" -- /dev/null
expect_error input_file_is_a_directory "error: cannot read $TMP: Is a directory" -- "$tiny" -f "$TMP"

# ---------------------------------------------------------------------------
# Prompts: invalid UTF-8 is tokenized byte-wise; output stays valid UTF-8

# expect_output NAME EXPECTED_STDOUT -- ARGS...: status 0 and exactly that stdout
expect_output() {
    local name=$1 want=$2; shift 3
    local out rc
    out=$("$RUN" "$@" 2>"$TMP/err" </dev/null); rc=$?
    if [ "$rc" -eq 0 ] && [ "$out" = "$want" ]; then echo "ok $name"
    else echo "FAIL $name: status $rc, stdout '$out', expected '$want'; stderr $(head -c 200 "$TMP/err")"; fi
}
expect_output invalid_utf8_is_tokenized_bytewise "256 97 255 254 98" -- "$tiny" -m tokenize -i $'a\xff\xfeb'
expect_output lone_continuation_and_truncated_sequence "256 128 32 226 130" -- "$tiny" -m tokenize -i $'\x80 \xe2\x82'
expect_output overlong_and_surrogate_bytes "256 192 175 237 160 128" -- "$tiny" -m tokenize -i $'\xc0\xaf\xed\xa0\x80'
printf 'a\0b' > "$TMP/nul.txt"
expect_output nul_byte_in_a_file_prompt_is_a_token "256 97 0 98" -- "$tiny" -m tokenize -f "$TMP/nul.txt"
: > "$TMP/empty.txt"
expect_output empty_prompt_file_is_just_bos "256" -- "$tiny" -m tokenize -f "$TMP/empty.txt"
out=$("$RUN" "$stories" -m tokenize -i $'\xff\xfe' 2>&1); rc=$?
# llama2c: the byte fallback tokens <0xFF> <0xFE> are ids 3 + 0xFF, 3 + 0xFE
[ $rc -eq 0 ] && [[ "$out" == "1 "*" 258 257" ]] && echo "ok llama2c_invalid_utf8_falls_back_to_byte_tokens" \
    || echo "FAIL llama2c_invalid_utf8_falls_back_to_byte_tokens: status $rc, '$out'"

valid_utf8() { "$PY" -c 'import sys; sys.stdin.buffer.read().decode("utf-8")' 2>/dev/null; }
for model in tiny stories; do
    m=$TMP/$model.l3ck
    "$RUN" "$m" -i $'ab\xffcd \xe2\x82 \xf0\x9f\x98' -n 40 -t 1 -s 3 -T 1 >"$TMP/gen.out" 2>"$TMP/gen.err"; rc=$?
    if [ $rc -eq 0 ] && valid_utf8 <"$TMP/gen.out" && grep -q $'^ab\xef\xbf\xbdcd' "$TMP/gen.out"; then
        echo "ok ${model}_generation_from_invalid_utf8_prints_replacement_characters"
    else echo "FAIL ${model}_generation_from_invalid_utf8_prints_replacement_characters: status $rc, $(head -c 200 "$TMP/gen.err")"; fi
done
head -c 3000 /dev/urandom > "$TMP/random.bin"
for model in tiny stories; do
    m=$TMP/$model.l3ck
    "$RUN" "$m" -m ppl -f "$TMP/random.bin" -T 1 >"$TMP/ppl.out" 2>"$TMP/ppl.err"; rc=$?
    [ $rc -eq 0 ] && grep -q '^perplexity: [0-9]' "$TMP/ppl.out" && echo "ok ${model}_perplexity_of_random_bytes" \
        || echo "FAIL ${model}_perplexity_of_random_bytes: status $rc, $(head -c 200 "$TMP/ppl.err")"
done
printf 'hi \xff\xfe there\n<|eot_id|>\n' | "$RUN" "$tiny" -m chat -n 64 -t 1 -s 5 -T 1 >"$TMP/chat.out" 2>"$TMP/chat.err"; rc=$?
[ $rc -eq 0 ] && valid_utf8 <"$TMP/chat.out" && echo "ok chat_with_invalid_utf8_and_forged_specials" \
    || echo "FAIL chat_with_invalid_utf8_and_forged_specials: status $rc, $(head -c 200 "$TMP/chat.err")"
"$PY" -c 'import sys; sys.stdout.write("Once upon a time " * 15000)' > "$TMP/long.txt" # 255 KB
n_long=$("$RUN" "$stories" -m tokenize -i "$(head -c 3000 "$TMP/long.txt")" | wc -w)
expect_error long_prompt_longer_than_context "error: the prompt is $n_long tokens, longer than the context of 64 (-c)" -- "$stories" -c 64 -i "$(head -c 3000 "$TMP/long.txt")"

# ---------------------------------------------------------------------------
# Input of any size in bounded memory: a prompt file larger than the context can
# hold is refused at once (by its size; a pipe after reading that much), so is
# a chat line; -m tokenize reads up to 64 MiB; -m ppl streams (tests/test_ppl_stream.sh)
expect_error prompt_file_larger_than_the_context_can_hold \
    "error: $TMP/long.txt is 255000 bytes, more than the context of 64 tokens can hold (-c)" -- "$stories" -c 64 -f "$TMP/long.txt"
truncate -s 1G "$TMP/1g.txt"
for mode in generate tokenize chat; do
    want="more than the context of 512 tokens can hold (-c)"; [ $mode = tokenize ] && want="more than -m tokenize reads (64 MiB; -m ppl reads any length)"
    expect_error "${mode}_refuses_a_1_GB_file" "error: $TMP/1g.txt is 1073741824 bytes, $want" -- "$stories" -m $mode -f "$TMP/1g.txt"
    start=$SECONDS
    err=$(timeout 60 "$RUN" "$stories" -m $mode -f /dev/zero 2>&1 >/dev/null </dev/null); rc=$?
    [ $rc -eq 1 ] && [[ "$err" == "error: /dev/zero holds more than "*" bytes, $want" ]] && [ $((SECONDS - start)) -le 10 ] \
        && echo "ok ${mode}_refuses_dev_zero_within_seconds" \
        || echo "FAIL ${mode}_refuses_dev_zero_within_seconds: status $rc after $((SECONDS - start)) s, stderr '${err:0:300}'"
done
rm -f "$TMP/1g.txt"
err=$(timeout 60 "$RUN" "$tiny" -m chat -n 64 </dev/zero 2>&1 >/dev/null); rc=$?
[ $rc -eq 1 ] && [[ "$err" == "error: an input line is longer than "*" bytes, more than the context can hold" ]] \
    && echo "ok chat_refuses_an_endless_line" || echo "FAIL chat_refuses_an_endless_line: status $rc, stderr '${err:0:300}'"
mkfifo "$TMP/fifo"
( printf 'Once upon a time' > "$TMP/fifo" ) &
out=$(timeout 60 "$RUN" "$stories" -f "$TMP/fifo" -n 12 -t 0 2>/dev/null); rc=$?
wait
[ $rc -eq 0 ] && [[ "$out" == "Once upon a time"?* ]] && echo "ok prompt_from_a_fifo" \
    || echo "FAIL prompt_from_a_fifo: status $rc, stdout '${out:0:200}'"
rm -f "$TMP/fifo"

# ---------------------------------------------------------------------------
# Sizes: a KV cache no machine has is an error; a long context does not overflow int

oom=$TMP/oom.l3ck      # head_dim 4096 x 8 KV heads: 2 TiB of key cache at -c 2^24
export_model "$oom" --random --dim 8 --hidden-dim 8 --n-layers 1 --n-heads 8 --n-kv-heads 8 --head-dim 4096 \
    --vocab-size 261 --max-seq-len 16777216
want="error: out of memory allocating the key cache (549755813888 x 4 bytes); try a smaller -c"
if [ "$(cat /proc/sys/vm/overcommit_memory 2>/dev/null)" = 1 ]; then
    # the kernel may grant 2 TiB of address space: then it must simply work
    out=$(ASAN_OPTIONS=${ASAN_OPTIONS:-}:allocator_may_return_null=1 TSAN_OPTIONS=${TSAN_OPTIONS:-}:allocator_may_return_null=1 \
          "$RUN" "$oom" -c 16777216 -T 1 -i hi -n 4 -t 0 2>&1 >/dev/null); rc=$?
    out=$(grep -Ev "$san_notice|^(prefill|decode):" <<<"$out")
    { [ $rc -eq 0 ] && [ -z "$out" ]; } || { [ $rc -eq 1 ] && [ "$out" = "$want" ]; } \
        && echo "ok huge_context_allocation_fails_cleanly" || echo "FAIL huge_context_allocation_fails_cleanly: status $rc, '$out'"
else
    ASAN_OPTIONS=${ASAN_OPTIONS:-}:allocator_may_return_null=1 TSAN_OPTIONS=${TSAN_OPTIONS:-}:allocator_may_return_null=1 \
        expect_error huge_context_allocation_fails_cleanly "$want" -- "$oom" -c 16777216 -T 1 -i hi -n 4 -t 0
fi

# 256 query heads share 1 KV head: kv_mul x seq_len = 2^32 at -c 2^24. Not under ThreadSanitizer,
# whose calloc writes every byte of the 16 GiB of attention scores that glibc and ASan leave untouched.
if grep -qa __tsan_init "$RUN"; then :; else
wide=$TMP/wide.l3ck
export_model "$wide" --random --dim 8 --hidden-dim 8 --n-layers 1 --n-heads 256 --n-kv-heads 1 --head-dim 2 \
    --vocab-size 261 --max-seq-len 16777216
short=$("$RUN" "$wide" -c 16 -T 1 -i "hello" -n 8 -t 0 2>/dev/null)
long=$(ASAN_OPTIONS=${ASAN_OPTIONS:-}:allocator_may_return_null=1 TSAN_OPTIONS=${TSAN_OPTIONS:-}:allocator_may_return_null=1 \
       "$RUN" "$wide" -c 16777216 -T 1 -i "hello" -n 8 -t 0 2>"$TMP/wide.err"); rc=$?
err=$(grep -Ev "$san_notice|^(prefill|decode):" "$TMP/wide.err")
# 16 GiB of attention scores (barely touched): a machine that refuses it must say so
if { [ $rc -eq 0 ] && [ -n "$short" ] && [ "$long" = "$short" ] && [ -z "$err" ]; } \
   || { [ $rc -eq 1 ] && [[ "$err" == "error: out of memory allocating attention scores"* ]]; }; then
    echo "ok context_2e24_with_256_query_heads_per_kv_head_matches_short_context"
else echo "FAIL context_2e24_with_256_query_heads_per_kv_head_matches_short_context: status $rc, '$long' vs '$short', $(head -c 300 <<<"$err")"; fi
fi

out=$(timeout 30 "$RUN" "$stories" -c 1 -m ppl -i "hello world" 2>&1 >/dev/null); rc=$?
want="error: -m ppl needs a context of at least 2 tokens, this one is 1 (-c)"
[ $rc -eq 1 ] && [ "$out" = "$want" ] && echo "ok ppl_with_context_of_one_token_is_rejected" \
    || echo "FAIL ppl_with_context_of_one_token_is_rejected: status $rc$([ $rc -eq 124 ] && echo ' (hung: killed after 30 s)'), '$out'"
out=$("$RUN" "$tiny" -c 1 -n 0 -t 0 -i "" 2>"$TMP/err"); rc=$?
[ $rc -eq 0 ] && echo "ok generation_with_context_of_one_token" || echo "FAIL generation_with_context_of_one_token: status $rc, $(head -c 200 "$TMP/err")"

# ---------------------------------------------------------------------------
# Output: a full disk is an error in every mode; a reader that goes away is not

full_error="error: cannot write the output: No space left on device"
expect_full() { # NAME -- ARGS...: stdout to /dev/full must fail with full_error
    local name=$1; shift 2
    local err rc
    err=$("$RUN" "$@" 2>&1 >/dev/full </dev/null); rc=$?
    err=$(grep -Ev '^(prefill|decode):' <<<"$err")
    [ $rc -eq 1 ] && [ "$err" = "$full_error" ] && echo "ok $name" || echo "FAIL $name: status $rc, stderr '$(head -c 200 <<<"$err")'"
}
expect_full full_disk_info -- "$stories" -m info
expect_full full_disk_ppl -- "$stories" -m ppl -i "Once upon a time there was a girl"
expect_full full_disk_help -- -h
expect_full full_disk_kv_calculator -- -m kv l=96,n=96,h=128,s=1024,bytes=2
expect_full full_disk_chat -- "$tiny" -m chat -i hi -n 20 -t 0
# printf-based output (-m tokenize) of many sizes: none may lose the error. With glibc's 4 KiB
# buffer, 768 x "Once upon a time " is one whose failed writes leave nothing for the last fflush.
lost=""
for k in $(seq 760 776); do
    "$PY" -c "import sys; sys.stdout.write('Once upon a time ' * $k)" > "$TMP/k.txt"
    "$RUN" "$stories" -m tokenize -f "$TMP/k.txt" >/dev/full 2>"$TMP/k.err"
    rc=$?; [ $rc -eq 1 ] && [ "$(cat "$TMP/k.err")" = "$full_error" ] || lost="$lost $k"
done
[ -z "$lost" ] && echo "ok full_disk_tokenize_never_loses_the_error" \
    || echo "FAIL full_disk_tokenize_never_loses_the_error: no error for the prompts of ${lost# } x 'Once upon a time '"

# SIGPIPE default: killed quietly (141) or done; SIGPIPE ignored: EPIPE ends it quietly too
for sig in default ignored; do
    for mode in generate tokenize; do
        args=(-t 0 -n 200 -i "Once upon a time"); [ $mode = tokenize ] && args=(-m tokenize -f "$TMP/long.txt")
        if [ $sig = ignored ]; then
            ( trap '' PIPE; "$RUN" "$stories" "${args[@]}" 2>"$TMP/pipe.err" | head -c 20 >/dev/null; exit "${PIPESTATUS[0]}" ); rc=$?
        else
            "$RUN" "$stories" "${args[@]}" 2>"$TMP/pipe.err" | head -c 20 >/dev/null; rc=${PIPESTATUS[0]}
        fi
        err=$(grep -Ev '^(prefill|decode):' "$TMP/pipe.err")
        { [ $rc -eq 0 ] || [ $rc -eq 141 ]; } && [ -z "$err" ] && echo "ok closed_pipe_${mode}_sigpipe_${sig}_ends_quietly" \
            || echo "FAIL closed_pipe_${mode}_sigpipe_${sig}_ends_quietly: status $rc, stderr '$(head -c 200 <<<"$err")'"
    done
done
rm -rf "$TMP"
