/* pool.h - the threads under run.c's matrix products and attention.

   A pool of persistent workers: pool_run(pool, fn, arg) runs fn(arg, i, n)
   on the n threads (the caller is thread 0) and returns when all are done;
   split_range cuts n items into the threads' shares. Workers spin briefly
   between tasks (a decode step hands out ~5 tasks per layer), then sleep
   on a condition variable. Built with -DUSE_OPENMP (make OPENMP=1), pool_run
   is an OpenMP parallel region instead. Included once, by run.c. */

#ifndef POOL_H
#define POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#ifdef USE_OPENMP
#include <omp.h>
#endif

typedef void (*TaskFn)(void *arg, int ith, int nth);
typedef struct ThreadPool ThreadPool;

struct ThreadPool {
    int n_threads;
    pthread_t *threads;
    TaskFn fn;
    void *arg;
    atomic_int generation; // bumped to start a task
    atomic_int pending;    // workers still running it
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t wake;
};

typedef struct { ThreadPool *pool; int ith; } WorkerArg;

// One step of a busy wait: pause first; after a while also yield the core,
// so a thread we wait for gets it when there are more threads than cores.
static inline void spin_wait(int spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins > 2000) sched_yield();
}

#ifndef USE_OPENMP
static void *worker_main(void *p) {
    WorkerArg *wa = p;
    ThreadPool *pool = wa->pool;
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen) {
            if (++spins < 100000) { spin_wait(spins); continue; }
            pthread_mutex_lock(&pool->mu);
            while (atomic_load(&pool->generation) == seen) pthread_cond_wait(&pool->wake, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        seen = atomic_load(&pool->generation);
        if (atomic_load(&pool->stop)) break;
        pool->fn(pool->arg, wa->ith, pool->n_threads);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
    free(wa);
    return NULL;
}
#endif

static void pool_run(ThreadPool *pool, TaskFn fn, void *arg) {
#ifdef USE_OPENMP
    #pragma omp parallel num_threads(pool->n_threads)
    fn(arg, omp_get_thread_num(), omp_get_num_threads());
#else
    if (pool->n_threads == 1) { fn(arg, 0, 1); return; }
    pool->fn = fn; pool->arg = arg;
    atomic_store(&pool->pending, pool->n_threads - 1);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n_threads);
    for (int spins = 1; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; spins++) spin_wait(spins);
#endif
}

static void pool_free(ThreadPool *pool) {
#ifndef USE_OPENMP
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->generation, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
#endif
    free(pool);
}

// n_threads threads (the caller and n_threads - 1 workers); NULL when the
// memory or the threads cannot be had.
static ThreadPool *pool_create(int n_threads) {
    ThreadPool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
#ifndef USE_OPENMP
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->threads = calloc(n_threads, sizeof(pthread_t));
    if (!pool->threads) { pool->n_threads = 1; pool_free(pool); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        WorkerArg *wa = malloc(sizeof *wa);
        if (wa) *wa = (WorkerArg){pool, i};
        if (!wa || pthread_create(&pool->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n_threads = i; // stop the workers started so far
            pool_free(pool);
            return NULL;
        }
    }
#endif
    return pool;
}

// The share [*lo, *hi) of n items that thread ith of nth works on, in
// multiples of `quantum` so threads never share a cache line of output.
static void split_range(int n, int ith, int nth, int quantum, int *lo, int *hi) {
    int chunks = (n + quantum - 1) / quantum;
    int per = chunks / nth, extra = chunks % nth;
    int c0 = ith * per + (ith < extra ? ith : extra);
    int c1 = c0 + per + (ith < extra);
    *lo = c0 * quantum < n ? c0 * quantum : n;
    *hi = c1 * quantum < n ? c1 * quantum : n;
}

#endif
