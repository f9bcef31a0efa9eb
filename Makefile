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
ENGINE_HDR := model.h tokenizer.h unicode_tables.h
C_TESTS    := $(patsubst %.c,%,$(wildcard tests/test_*.c))

.PHONY: all demo test bench clean
all: run

run: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -o $@ $(ENGINE_SRC) $(LDLIBS)

# The OpenMP variant of the thread pool; the tests check it gives the same tokens.
run-omp: $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -fopenmp -DUSE_OPENMP -o $@ $(ENGINE_SRC) $(LDLIBS)

# Test programs that #include run.c (with TESTING defined) to reach internals.
tests/%: tests/%.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) -DTESTING -I. -o $@ $< tokenizer.c $(LDLIBS)

# The tokenizer tests share a helper header.
$(filter tests/test_tokenizer_%,$(C_TESTS)): tests/tokenizer_testlib.h

bench/bench_tokenizer: bench/bench_tokenizer.c tokenizer.c tokenizer.h model.h unicode_tables.h
	$(CC) $(CFLAGS) -I. -o $@ bench/bench_tokenizer.c tokenizer.c

models/stories260K.l3ck: models/stories260K.bin models/tok512.bin export/export.py
	python3 export/export.py $@ --llama2c models/stories260K.bin --tokenizer models/tok512.bin

demo: run models/stories260K.l3ck
	./run models/stories260K.l3ck -i "Once upon a time" -n 200

test: run run-omp tests/logits $(C_TESTS)
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	RUN=./run PYTHON=$(PYTHON) SHARED=$(SHARED) bash tests/run_tests.sh

clean:
	rm -f run run-omp tests/logits bench/bench_tokenizer $(C_TESTS) models/*.l3ck
