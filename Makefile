# Build, test and demo. `make` builds ./run for this machine (-march=native);
# `make PORTABLE=1` builds for any x86-64/aarch64; `make OPENMP=1` uses OpenMP
# instead of the pthread pool.
CC      ?= cc
SHARED  ?= ../shared
ifeq ($(PORTABLE),1)
ARCH    :=
else
ARCH    := -march=native
endif
CFLAGS  ?= -O3 $(ARCH)
CFLAGS  += -std=c11 -D_GNU_SOURCE -ffp-contract=fast -Wall -Wextra -Wshadow
LDLIBS  := -lm -lpthread
ifeq ($(OPENMP),1)
CFLAGS  += -fopenmp -DUSE_OPENMP
endif
# The first python3 that can import numpy (the one first on PATH may not).
PYTHON  ?= $(shell for p in python3 /usr/bin/python3 python; do \
             $$p -c 'import numpy' >/dev/null 2>&1 && { command -v $$p; break; }; done)

ENGINE_SRC := run.c tokenizer.c
ENGINE_HDR := kernels.h matmul.h model.h pool.h tokenizer.h unicode_tables.h
C_TESTS    := $(patsubst %.c,%,$(wildcard tests/test_*.c))

.PHONY: all demo test bench bench-mla clean
all: run

run: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -o $@ $(ENGINE_SRC) $(LDLIBS)

# The OpenMP variant of the thread pool; the tests check it gives the same tokens.
run-omp: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -fopenmp -DUSE_OPENMP -o $@ $(ENGINE_SRC) $(LDLIBS)

# Test programs that #include run.c (with TESTING defined) to reach internals.
tests/%: tests/%.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

# The kernels' narrower paths, tested by make test next to the native build on
# an x86-64 CPU that can run them: test_engine built for AVX2 + FMA + F16C
# (x86-64-v3) and for baseline x86-64 (SSE2 vectors, the scalar q8_0 dot).
ifeq ($(shell uname -m),x86_64)
WIDTH_TESTS := tests/test_engine_sse2
ifneq ($(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw f16c /proc/cpuinfo && echo y),)
WIDTH_TESTS += tests/test_engine_avx2
endif
endif
NARROW_CFLAGS := $(filter-out -march=%,$(CFLAGS))
tests/test_engine_avx2: tests/test_engine.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(NARROW_CFLAGS) -march=x86-64-v3 -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)
tests/test_engine_sse2: tests/test_engine.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(NARROW_CFLAGS) -march=x86-64 -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

# The Arm NEON paths (sdot integer dot products, float16 and int8
# conversions), on a machine of another architecture that has a cross
# compiler: test_engine built for Armv8.2-A with the dot-product extension,
# run under qemu by tests/test_engine_neon.sh (.ci/run installs both: apt-get
# install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user). On an Arm
# machine the native test_engine runs them.
AARCH64_CC ?= aarch64-linux-gnu-gcc
ifneq ($(shell uname -m),aarch64)
ifneq ($(shell command -v $(AARCH64_CC) 2>/dev/null),)
WIDTH_TESTS += tests/engine_neon
endif
endif
tests/engine_neon: tests/test_engine.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(AARCH64_CC) $(NARROW_CFLAGS) -march=armv8.2-a+dotprod -static -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

# The tokenizer tests share a helper header.
$(filter tests/test_tokenizer_% tests/test_ppl_stream,$(C_TESTS)): tests/tokenizer_testlib.h

bench/bench_tokenizer: bench/bench_tokenizer.c tokenizer.c tokenizer.h model.h unicode_tables.h
	$(CC) $(CFLAGS) -I. -o $@ bench/bench_tokenizer.c tokenizer.c

bench/bandwidth bench/fma_peak: bench/%: bench/%.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# Decode at a given depth with the engine's own forward() (it #includes run.c);
# the attention kernels alone, per KV cache type.
bench/decode_at_depth bench/attention: bench/%: bench/%.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

# Speed against this machine's measured limits (see bench/bench.py); models
# are generated once into ~/.cache/l3bench. BENCH_ARGS=--quick for a short run.
bench: run bench/bench_tokenizer bench/bandwidth bench/fma_peak bench/decode_at_depth
	python3 bench/bench.py $(BENCH_ARGS)

# The MLA depth table alone: MLA 512 + 64 against GQA-8 at depths 1, 1024, 4000,
# measured against the bytes model and the compute-aware one (bench/bench.py).
bench-mla: run bench/bandwidth bench/fma_peak bench/decode_at_depth
	python3 bench/bench.py --mla-depth $(BENCH_ARGS)

models/stories260K.l3ck: models/stories260K.bin models/tok512.bin export/export.py
	python3 export/export.py $@ --llama2c models/stories260K.bin --tokenizer models/tok512.bin

demo: run models/stories260K.l3ck
	./run models/stories260K.l3ck -i "Once upon a time" -n 200

# tests/deps.sh finds a python3 with numpy, or installs python3-numpy (as root), or
# says the one command to run.
FIND_PYTHON = PY=$$(PYTHON=$(PYTHON) bash tests/deps.sh) || exit 1
test: run run-omp tests/logits $(C_TESTS) $(WIDTH_TESTS)
	@$(FIND_PYTHON); echo "RUN=./run PYTHON=$$PY SHARED=$(SHARED) bash tests/run_tests.sh"; \
	  RUN=./run PYTHON=$$PY SHARED=$(SHARED) bash tests/run_tests.sh

clean:
	rm -f run run-omp tests/logits bench/bench_tokenizer bench/bandwidth bench/fma_peak bench/decode_at_depth bench/attention $(C_TESTS) tests/test_engine_avx2 tests/test_engine_sse2 tests/engine_neon models/*.l3ck

# ----------------------------------------------------------------------------
# Sanitizers, valgrind, fuzzing
#   make asan / tsan   ./run-asan (AddressSanitizer + UBSan) / ./run-tsan (ThreadSanitizer)
#   make test-asan     the whole suite against ./run-asan, the C tests rebuilt with it too
#   make test-tsan     the same with ThreadSanitizer
#   make valgrind      memcheck of a short generation: no errors, no leaks
#   make fuzz          each libFuzzer harness (tests/fuzz/) for FUZZ_SECONDS; needs clang
# The C tests are rebuilt in place for a sanitizer run and deleted after it,
# so the next `make test` builds them plain again.
SAN_CFLAGS  := $(ARCH) -std=c11 -D_GNU_SOURCE -ffp-contract=fast -Wall -Wextra -Wshadow -g -O1 -fno-omit-frame-pointer
ASAN_FLAGS  := -fsanitize=address,undefined -fno-sanitize-recover=undefined
TSAN_FLAGS  := -fsanitize=thread
# allocator_may_return_null: a failed huge allocation returns NULL, as malloc does, and the engine reports it
SAN_ENV     := ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:strict_string_checks=1 \
               UBSAN_OPTIONS=print_stacktrace=1 TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1
FUZZ_CC     ?= clang
FUZZ_FLAGS  := $(SAN_CFLAGS) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_SECONDS ?= 60

.PHONY: asan tsan test-asan test-tsan valgrind fuzz clean-sanitizers
asan: run-asan
tsan: run-tsan

run-asan: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(SAN_CFLAGS) $(ASAN_FLAGS) -o $@ $(ENGINE_SRC) $(LDLIBS)

run-tsan: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(SAN_CFLAGS) $(TSAN_FLAGS) -o $@ $(ENGINE_SRC) $(LDLIBS)

test-asan test-tsan: test-%: run-% run $(WIDTH_TESTS)  # ./run: export.py --calib tokenizes with it
	@$(FIND_PYTHON)
	$(MAKE) -B tests/logits $(C_TESTS) CFLAGS="$(SAN_CFLAGS) $(if $(filter asan,$*),$(ASAN_FLAGS),$(TSAN_FLAGS))"
	@$(FIND_PYTHON); $(SAN_ENV) SANITIZER=$* RUN=./run-$* PYTHON=$$PY SHARED=$(SHARED) bash tests/run_tests.sh; \
	  rc=$$?; rm -f tests/logits $(C_TESTS); exit $$rc

# Without -march=native: valgrind does not know AVX-512.
run-valgrind: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) -std=c11 -D_GNU_SOURCE -O1 -g -o $@ $(ENGINE_SRC) $(LDLIBS)

VALGRIND    := valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all
valgrind: run-valgrind models/stories260K.l3ck
	$(VALGRIND) ./run-valgrind models/stories260K.l3ck -i "Once upon a time" -n 40 -t 0.9 -s 7 -T 2 >/dev/null
	$(VALGRIND) ./run-valgrind models/stories260K.l3ck -m ppl -i "Once upon a time there was a girl" --kv-heads 2 -T 2 >/dev/null
	$(VALGRIND) ./run-valgrind models/stories260K.l3ck -m ppl -i "Once upon a time there was a girl" --kv-type q8_0 -T 2 >/dev/null
	$(VALGRIND) ./run-valgrind models/stories260K.l3ck -t 0 -n 40 -i "Once upon a time" --kv-type f16 -T 2 >/dev/null
	@echo "valgrind: no errors, no leaks"

tests/fuzz/fuzz_loader: tests/fuzz/fuzz_loader.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(FUZZ_CC) $(FUZZ_FLAGS) -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

tests/fuzz/fuzz_tokenizer: tests/fuzz/fuzz_tokenizer.c tokenizer.c tokenizer.h model.h unicode_tables.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -I. -o $@ $< tokenizer.c

fuzz: tests/fuzz/fuzz_loader tests/fuzz/fuzz_tokenizer
	PYTHON=$(PYTHON) SHARED=$(SHARED) bash tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS)

clean: clean-sanitizers
clean-sanitizers:
	rm -f run-asan run-tsan run-valgrind tests/fuzz/fuzz_loader tests/fuzz/fuzz_tokenizer
	rm -rf tests/fuzz/build
