/* bench_tokenizer.c - single-threaded encode throughput of the Llama 3
   tokenizer: encodes a text file 5 times and prints the median MB/s, by the
   wall clock and by this process's CPU time (which other programs sharing
   the machine disturb less).

   python3 export/tokenizer_section.py ../shared/models/llama3-tokenizer.json /tmp/llama3.tok
   cc -O3 -march=native -std=c11 -D_GNU_SOURCE -I. -o bench/bench_tokenizer bench/bench_tokenizer.c tokenizer.c
   ./bench/bench_tokenizer /tmp/llama3.tok ../shared/corpora/prose.txt */
#include "model.h"
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LLAMA3_TOKENIZER_SECTION TEXT_FILE\n", argv[0]);
        return 1;
    }
    size_t section_len, text_len, n_ids = 0;
    char *section = read_file(argv[1], &section_len), *text = read_file(argv[2], &text_len), err[256];
    double t0 = seconds(CLOCK_MONOTONIC);
    Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, section, section_len, err, sizeof err);
    if (!t) { fprintf(stderr, "error: %s: %s\n", argv[1], err); return 1; }
    printf("tokenizer_build: %.1f ms\n", (seconds(CLOCK_MONOTONIC) - t0) * 1e3);
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
    printf("%s: %zu bytes -> %zu tokens\n", argv[2], text_len, n_ids);
    printf("encode, median of %d runs: %.1f MB/s wall clock (min %.1f, max %.1f), %.1f MB/s CPU time\n",
           RUNS, wall[RUNS / 2], wall[0], wall[RUNS - 1], cpu[RUNS / 2]);
    tokenizer_free(t);
    free(section);
    free(text);
    return 0;
}
