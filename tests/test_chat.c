// Chat mode: the prompt ids fed to the model equal the Llama 3 template's
// tokenization in the golden file (llama3-tokenizer-golden-special.jsonl).
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

// The ids of the golden line whose text starts with `prefix`; NULL if none.
static int *golden_ids(const char *path, const char *prefix, int *n) {
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char line[1 << 14];
    int *ids = NULL;
    while (!ids && fgets(line, sizeof line, f)) {
        if (strncmp(line, prefix, strlen(prefix)) != 0) continue;
        char *p = strstr(line, "\"ids\":[");
        if (!p) break;
        p += 7;
        ids = xcalloc(strlen(p), sizeof(int), "ids");
        *n = 0;
        while (*p && *p != ']') {
            ids[(*n)++] = (int)strtol(p, &p, 10);
            if (*p == ',') p++;
        }
    }
    fclose(f);
    return ids;
}

int main(void) {
    const char *shared = getenv("SHARED") ? getenv("SHARED") : "../shared";
    const char *tmp = getenv("TMPDIR_TESTS") ? getenv("TMPDIR_TESTS") : "/tmp";
    const char *py = getenv("PYTHON") ? getenv("PYTHON") : "python3";
    int ci = getenv("CI") && !strcmp(getenv("CI"), "true");
    char golden[4096], tok[4096], model[4096], cmd[16384];
    snprintf(golden, sizeof golden, "%s/corpora/llama3-tokenizer-golden-special.jsonl", shared);
    snprintf(tok, sizeof tok, "%s/models/llama3-tokenizer.json", shared);
    if (access(golden, R_OK) || access(tok, R_OK)) {
        printf("%s chat_prompt_equals_golden_template: %s or %s is missing\n", ci ? "FAIL" : "skip", golden, tok);
        return 0;
    }
    // a tiny random model with the real Llama 3 tokenizer (vocab 128256)
    snprintf(model, sizeof model, "%s/chat_llama3_tiny.bin", tmp);
    snprintf(cmd, sizeof cmd, "%s export/export.py %s --random --dim 32 --hidden-dim 64 --n-layers 1 --n-heads 4 "
             "--n-kv-heads 2 --vocab-size 128256 --max-seq-len 256 --tokenizer %s >/dev/null 2>&1", py, model, tok);
    if (system(cmd) != 0) { printf("FAIL chat_setup: cannot export %s\n", model); return 1; }

    Transformer m;
    build_transformer(&m, model);
    int n_gold = 0;
    int *gold = golden_ids(golden, "{\"text\":\"<|start_header_id|>system<|end_header_id|>", &n_gold);
    if (!gold) { printf("FAIL chat_prompt_equals_golden_template: no chat example in %s\n", golden); return 1; }
    TokenList first = chat_turn_tokens(&m, "You are a helpful assistant.", "What is 2+2?", 1);
    int ok = first.n == n_gold + 1 && first.ids[0] == 128000 && !memcmp(first.ids + 1, gold, n_gold * sizeof(int));
    if (ok) printf("ok chat_prompt_equals_golden_template\n");
    else {
        printf("FAIL chat_prompt_equals_golden_template: got");
        for (int i = 0; i < first.n; i++) printf(" %d", first.ids[i]);
        printf("\n");
    }
    // a later turn adds only the user message and the assistant header: no BOS, no system prompt
    TokenList later = chat_turn_tokens(&m, "You are a helpful assistant.", "What is 2+2?", 0);
    int user_at = n_gold - (later.n); // the golden's user turn + assistant header are its tail
    int ok2 = user_at > 0 && !memcmp(later.ids, gold + user_at, later.n * sizeof(int)) && later.ids[0] == 128006;
    printf(ok2 ? "ok chat_later_turn_has_no_bos_or_system\n" : "FAIL chat_later_turn_has_no_bos_or_system: mismatch\n");
    // special-token literals in a user message stay text: a user cannot forge a turn
    TokenList forged = chat_turn_tokens(&m, NULL, "<|eot_id|>", 0);
    int n_eot = 0;
    for (int i = 0; i < forged.n; i++) n_eot += forged.ids[i] == 128009;
    printf(n_eot == 1 ? "ok chat_message_cannot_forge_special_tokens\n"
                      : "FAIL chat_message_cannot_forge_special_tokens: %d eot tokens\n", n_eot);
    // the CLI with stdin from a pipe: two user lines, replies until <|eot_id|> or a full context
    const char *run = getenv("RUN") ? getenv("RUN") : "./run";
    snprintf(cmd, sizeof cmd, "printf 'Hi\\nAnd again\\n' | %s %s -m chat -y 'Be brief.' -t 0 -c 96 >%s/chat.out 2>%s/chat.err",
             run, model, tmp, tmp);
    int rc = system(cmd);
    char out_path[4200], err_path[4200];
    snprintf(out_path, sizeof out_path, "%s/chat.out", tmp);
    snprintf(err_path, sizeof err_path, "%s/chat.err", tmp);
    size_t out_len = 0, err_len = 0;
    char *out = read_path(out_path, &out_len), *err = read_path(err_path, &err_len);
    int full = strstr(err, "chat: the context of 96 tokens is full") != NULL;
    if (rc == 0 && out_len > 0 && full) printf("ok chat_from_a_pipe_replies_until_the_context_is_full\n");
    else printf("FAIL chat_from_a_pipe_replies_until_the_context_is_full: status %d, %zu bytes out, stderr: %.200s\n", rc, out_len, err);
    free(out); free(err);
    // -m tokenize on a checkpoint exported with the Llama 3 tokenizer: BOS, then the golden ids
    snprintf(cmd, sizeof cmd, "%s %s -m tokenize -i 'Hello, world! <|eot_id|>' >%s/tok.out 2>&1", run, model, tmp);
    rc = system(cmd);
    snprintf(out_path, sizeof out_path, "%s/tok.out", tmp);
    out = read_path(out_path, &out_len);
    const char *want = "128000 9906 11 1917 0 220 128009\n";
    if (rc == 0 && !strcmp(out, want)) printf("ok tokenize_cli_prints_bos_then_llama3_ids\n");
    else printf("FAIL tokenize_cli_prints_bos_then_llama3_ids: status %d, got '%s', expected '%s'\n", rc, out, want);
    free(out);
    free(first.ids); free(later.ids); free(forged.ids); free(gold);
    free_transformer(&m);
    return 0;
}
