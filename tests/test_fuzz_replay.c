// Replays the tokenizer fuzzer's inputs (tests/fuzz/fuzz_tokenizer.c, with all
// its checks) without libFuzzer: the seeds in tests/fuzz/corpus_tokenizer/
// and the inputs that once failed, in tests/fuzz/regressions/tokenizer/.
// Each input runs in a child process, so a crash or a failed check is one
// FAIL line. (The loader fuzzer's inputs are model files: test_malformed.py
// runs the engine on them.)
#include "tokenizer_testlib.h"
#include "fuzz/fuzz_tokenizer.c"

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

static int n_failed = 0;

static void replay_dir(const char *dir, const char *label) {
    DIR *d = opendir(dir);
    if (!d) return; // no regressions yet
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096], name[512];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(name, sizeof name, "fuzz_replay_tokenizer_%s_%s", label, e->d_name);
        size_t len;
        char *data = read_file(path, &len);
        if (!data) { n_failed += !check(0, name, "cannot read %s", path); continue; }
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            LLVMFuzzerTestOneInput((const uint8_t *)data, len);
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        n_failed += !check(pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, name,
                           "the harness %s (see its stderr above)",
                           WIFSIGNALED(status) ? "crashed or failed a check" : "exited non-zero");
        free(data);
    }
    closedir(d);
}

int main(void) {
    // The Llama 3 vocabulary, if ../shared has it (the same scratch file test_tokenizer_llama3 writes)
    char *section = NULL;
    Tokenizer *t = load_shared_tokenizer(TOKENIZER_LLAMA3, "models/llama3-tokenizer.json", "llama3.tok", &section);
    if (t) setenv("FUZZ_LLAMA3_TOK", scratch_path("llama3.tok"), 1);
    else setenv("FUZZ_LLAMA3_TOK", "/nonexistent", 1); // the harness's built-in vocabulary
    tokenizer_free(t);
    free(section);
    LLVMFuzzerInitialize(NULL, NULL);
    replay_dir("tests/fuzz/corpus_tokenizer", "seed");
    replay_dir("tests/fuzz/regressions/tokenizer", "regression");
    tokenizer_free(llama3);
    tokenizer_free(llama2c);
    free(llama3_section);
    free(llama2c_section);
    return n_failed ? 1 : 0;
}
