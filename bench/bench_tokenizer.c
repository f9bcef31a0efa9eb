/* bench_tokenizer.c - single-threaded encode throughput of the Llama 3
   tokenizer: encodes a text file 5 times and prints the median MB/s, by the
   wall clock and by this process's CPU time (which other programs sharing
   the machine disturb less).

   Build: cc -O3 -march=native -std=c11 -D_GNU_SOURCE -I. -o bench/bench_tokenizer bench/bench_tokenizer.c tokenizer.c
   Run:   ./bench/bench_tokenizer [TOKENIZER_SECTION TEXT_FILE]
   With no arguments (from the repo root) it writes the section of
   $SHARED/models/llama3-tokenizer.json (SHARED defaults to ../shared) with
   export/tokenizer_section.py into a temporary file, and encodes
   $SHARED/corpora/prose.txt. */
#include "model.h"
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { RUNS = 5 };

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc(*len ? *len : 1);
    if (!data || fread(data, 1, *len, f) != *len) { fprintf(stderr, "error: cannot read %s\n", path); exit(1); }
    fclose(f);
    return data;
}

static double seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Writes the Llama 3 tokenizer section from $SHARED into a temporary file;
   returns its path (static). */
static const char *make_section(const char *shared) {
    static char path[4096];
    char cmd[12288];
    const char *tmp = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/bench-tokenizer-%d.tok", tmp ? tmp : "/tmp", (int)getpid());
    snprintf(cmd, sizeof cmd, "python3 export/tokenizer_section.py '%s/models/llama3-tokenizer.json' '%s' >/dev/null",
             shared, path);
    if (system(cmd) != 0) {
        fprintf(stderr, "error: `%s` failed (run from the repo root, or pass a section file)\n", cmd);
        exit(1);
    }
    return path;
}

int main(int argc, char **argv) {
    if (argc != 1 && argc != 3) {
        fprintf(stderr, "usage: %s [LLAMA3_TOKENIZER_SECTION TEXT_FILE]\n", argv[0]);
        return 1;
    }
    const char *shared = getenv("SHARED") ? getenv("SHARED") : "../shared";
    char text_path[4096];
    snprintf(text_path, sizeof text_path, "%s/corpora/prose.txt", shared);
    const char *section_path = argc == 3 ? argv[1] : make_section(shared);
    if (argc == 3) snprintf(text_path, sizeof text_path, "%s", argv[2]);
    size_t section_len, text_len, n_ids = 0;
    char *section = read_file(section_path, &section_len), *text = read_file(text_path, &text_len), err[256];
    if (argc == 1) remove(section_path);
    double t0 = seconds(CLOCK_MONOTONIC);
    Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, section, section_len, err, sizeof err);
    if (!t) { fprintf(stderr, "error: %s: %s\n", section_path, err); return 1; }
    double build_ms = (seconds(CLOCK_MONOTONIC) - t0) * 1e3;
    double wall[RUNS], cpu[RUNS]; // MB/s of each run
    for (int r = 0; r < RUNS; r++) {
        double w0 = seconds(CLOCK_MONOTONIC), c0 = seconds(CLOCK_PROCESS_CPUTIME_ID);
        int *ids = tokenizer_encode(t, text, text_len, 0, &n_ids);
        cpu[r] = text_len / 1e6 / (seconds(CLOCK_PROCESS_CPUTIME_ID) - c0);
        wall[r] = text_len / 1e6 / (seconds(CLOCK_MONOTONIC) - w0);
        free(ids);
    }
    qsort(wall, RUNS, sizeof(double), by_value);
    qsort(cpu, RUNS, sizeof(double), by_value);
    printf("encode, median of %d runs: %.1f MB/s wall clock (min %.1f, max %.1f), %.1f MB/s CPU time\n",
           RUNS, wall[RUNS / 2], wall[0], wall[RUNS - 1], cpu[RUNS / 2]);
    printf("%s: %zu bytes -> %zu tokens; tokenizer_build %.1f ms\n", text_path, text_len, n_ids, build_ms);
    tokenizer_free(t);
    free(section);
    free(text);
    return 0;
}
