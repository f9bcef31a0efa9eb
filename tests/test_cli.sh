#!/usr/bin/env bash
# Every command-line error path: the exact one-line message and exit status 1.
set -u
RUN=${RUN:-./run}; PY=${PYTHON:-python3}; TMP=${TMPDIR_TESTS:-/tmp}
model=$TMP/cli_stories.l3ck
"$PY" export/export.py "$model" --llama2c models/stories260K.bin --tokenizer models/tok512.bin >/dev/null 2>&1 \
    || { echo "FAIL cli_setup: cannot export the demo model"; exit 1; }

# expect_error NAME EXPECTED_STDERR_FIRST_LINE -- ARGS...
expect_error() {
    local name=$1 want=$2; shift 3
    local err rc
    err=$("$RUN" "$@" 2>&1 >/dev/null); rc=$?
    local first=${err%%$'\n'*}
    if [ "$rc" -eq 1 ] && [ "$first" = "$want" ]; then echo "ok $name"
    else echo "FAIL $name: status $rc, stderr '$first', expected '$want'"; fi
}

expect_error no_model_prints_usage "error: no model file given" --
expect_error unknown_flag_is_rejected "error: unknown option '-x'" -- "$model" -x 1
expect_error long_unknown_flag_is_rejected "error: unknown option '--frobnicate'" -- "$model" --frobnicate
expect_error flag_without_value_is_rejected "error: option -n needs a value" -- "$model" -n
expect_error two_model_paths_are_rejected "error: unexpected argument 'extra'" -- "$model" extra
expect_error negative_temperature_is_rejected "error: -t expects a number in [0, 1e+06], got '-1'" -- "$model" -t -1
expect_error topp_above_one_is_rejected "error: -p expects a number in [0, 1], got '1.5'" -- "$model" -p 1.5
expect_error zero_threads_is_rejected "error: -T expects an integer in [1, 1024], got '0'" -- "$model" -T 0
expect_error non_numeric_steps_is_rejected "error: -n expects an integer in [0, 2147483647], got '12x'" -- "$model" -n 12x
expect_error negative_steps_is_rejected "error: -n expects an integer in [0, 2147483647], got '-5'" -- "$model" -n -5
expect_error empty_number_is_rejected "error: -s expects an integer in [0, 9223372036854775807], got ''" -- "$model" -s ""
expect_error context_beyond_model_is_rejected "error: -c 100000 exceeds the model's maximum context of 512" -- "$model" -c 100000
expect_error unknown_mode_is_rejected "error: unknown mode 'sing' (generate, chat, ppl, tokenize, info, kv)" -- "$model" -m sing
expect_error input_twice_is_rejected "error: give the input with -i or -f, not both" -- "$model" -i a -f b
expect_error ppl_needs_input "error: -m ppl needs an input: -i TEXT or -f FILE" -- "$model" -m ppl
expect_error missing_input_file "error: cannot open $TMP/nope.txt: No such file or directory" -- "$model" -f "$TMP/nope.txt"
expect_error missing_model_file "error: cannot open model $TMP/nope.bin: No such file or directory" -- "$TMP/nope.bin"
expect_error llama2c_file_says_how_to_convert "error: models/stories260K.bin: not a model file of this engine (it looks like a llama2.c checkpoint); convert it: python3 export/export.py out.bin --llama2c models/stories260K.bin --tokenizer tokenizer.bin" -- models/stories260K.bin
printf 'hello world, this is not a model at all, no no no' > "$TMP/text.bin"
expect_error short_file_is_rejected "error: $TMP/text.bin: file is 49 bytes, too short for a model header (256); truncated?" -- "$TMP/text.bin"
head -c 1000000 "$model" > "$TMP/truncated.l3ck"
expect_error truncated_model_is_rejected "error: $TMP/truncated.l3ck: file is 1000000 bytes, header says 1048704; truncated download or corrupt file? re-export it" -- "$TMP/truncated.l3ck"
long=$(printf 'Once upon a time %.0s' $(seq 1 40))
n_long=$("$RUN" "$model" -m tokenize -i "$long" | wc -w)
expect_error prompt_longer_than_context "error: the prompt is $n_long tokens, longer than the context of 64 (-c)" -- "$model" -c 64 -i "$long"
expect_error steps_shorter_than_prompt "error: -n 3 is less than the prompt's 5 tokens (BOS included)" -- "$model" -n 3 -i "Once upon a time"
expect_error invalid_kv_heads_names_the_valid_values "error: --kv-heads 3 is not possible for this model (8 query heads, 4 KV heads); valid: 1, 2, 4, 8" -- "$model" --kv-heads 3
expect_error kv_heads_beyond_query_heads_is_rejected "error: --kv-heads 16 is not possible for this model (8 query heads, 4 KV heads); valid: 1, 2, 4, 8" -- "$model" --kv-heads 16
expect_error unknown_kv_type_is_rejected "error: --kv-type expects f32, f16 or q8_0, got 'q4'" -- "$model" --kv-type q4
expect_error kv_type_without_value_is_rejected "error: option --kv-type needs a value" -- "$model" --kv-type
expect_error kv_calculator_rejects_unknown_keys "error: -m kv: 'x' is not one of l=, n=, h=, s=, bytes=, g= (e.g. l=96,n=96,h=128,s=1024,bytes=2)" -- -m kv l=1,x=2
expect_error kv_calculator_needs_the_shape "error: -m kv needs l=, n=, h= and s= (e.g. l=96,n=96,h=128,s=1024,bytes=2)" -- -m kv l=96
expect_error chat_needs_llama3_tokenizer "error: chat needs a Llama 3 instruct tokenizer; this one has no <|eot_id|> token" -- "$model" -m chat -i hi

out=$("$RUN" -h 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q '^usage: ./run MODEL.bin' <<<"$out" && grep -q 'at most 4096' <<<"$out"; then echo "ok help_exits_zero_and_states_the_context_cap"
else echo "FAIL help_exits_zero_and_states_the_context_cap: status $rc"; fi
out=$("$RUN" "$model" -m tokenize -i "Once upon a time" 2>&1)
[ "$out" = "1 403 407 261 378" ] && echo "ok tokenize_prints_bos_then_ids" || echo "FAIL tokenize_prints_bos_then_ids: got '$out'"
"$RUN" "$model" -t 0 -n 200 -i "Once upon a time" > /dev/full 2>"$TMP/full.err"; rc=$?
[ $rc -eq 1 ] && grep -q '^error: cannot write the output: No space left on device' "$TMP/full.err" \
    && echo "ok write_error_is_reported" || echo "FAIL write_error_is_reported: status $rc, $(head -1 "$TMP/full.err")"
"$RUN" "$model" -t 0 -n 200 -i "Once upon a time" 2>"$TMP/pipe.err" | head -c 20 >/dev/null; rc=${PIPESTATUS[0]}
{ [ $rc -eq 0 ] || [ $rc -eq 141 ]; } && ! grep -q 'error' "$TMP/pipe.err" \
    && echo "ok closed_pipe_ends_quietly" || echo "FAIL closed_pipe_ends_quietly: status $rc, $(head -1 "$TMP/pipe.err")"

# The textbook GPT-3 figures (96 layers, 96 heads of 128, 1024 positions, 2-byte elements)
out=$("$RUN" -m kv l=96,n=96,h=128,s=1024,bytes=2)
grep -qE '^  MHA +96 +4718592 +4\.50 GiB$' <<<"$out" && grep -qE '^  GQA-8 +8 +393216 +384\.00 MiB$' <<<"$out" \
    && grep -qE '^  MQA +1 +49152 +48\.00 MiB$' <<<"$out" \
    && echo "ok kv_calculator_reproduces_gpt3_figures" || echo "FAIL kv_calculator_reproduces_gpt3_figures: $out"
# kv_bytes_per_token = n_layers x 2 x n_kv_heads x head_dim x 4 (f32 cache), before and after --kv-heads
for K in "" 1 2 8; do
    info=$("$RUN" "$model" -m info ${K:+--kv-heads $K})
    kv=$(sed -n 's/^n_kv_heads: //p' <<<"$info"); got=$(sed -n 's/^kv_bytes_per_token: //p' <<<"$info")
    want=$((5 * 2 * ${K:-4} * 8 * 4))
    [ "$kv" = "${K:-4}" ] && [ "$got" = "$want" ] && echo "ok kv_bytes_per_token_matches_formula${K:+_kv$K}" \
        || echo "FAIL kv_bytes_per_token_matches_formula${K:+_kv$K}: n_kv_heads $kv, $got bytes, expected $want"
done
# with --kv-type: n_layers x 2 x n_kv_heads x bytes per row of head_dim 8 (f16: 16; q8_0: 8 int8 + one float16 scale)
for spec in "f32 32" "f16 16" "q8_0 10" "q8_0 10 2"; do
    set -- $spec
    info=$("$RUN" "$model" -m info --kv-type "$1" ${3:+--kv-heads $3})
    dt=$(sed -n 's/^kv_cache_dtype: //p' <<<"$info"); got=$(sed -n 's/^kv_bytes_per_token: //p' <<<"$info")
    want=$((5 * 2 * ${3:-4} * $2))
    [ "$dt" = "$1" ] && [ "$got" = "$want" ] && echo "ok kv_type_${1}${3:+_kv$3}_info_prints_dtype_and_bytes_per_token" \
        || echo "FAIL kv_type_${1}${3:+_kv$3}_info_prints_dtype_and_bytes_per_token: dtype '$dt', $got bytes, expected $want"
done
