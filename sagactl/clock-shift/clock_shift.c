/*
 * A host whose wall clock is off, for one process: preloaded (LD_PRELOAD) by
 * `sagactl chaos --clock-skew NAME=SECONDS`, with the offset in CLOCK_SHIFT_SECS.
 *
 * Why not libfaketime: it shifts what a process reads from the wall clock, but a
 * timed wait whose deadline was computed from that shifted clock is then waited
 * for on the kernel's real one. librdkafka computes every timed wait's deadline
 * from the wall clock (gettimeofday, timespec_get, clock_gettime(CLOCK_REALTIME))
 * and waits on a CLOCK_REALTIME condition variable, so ten minutes behind every
 * wait timed out at once and ten minutes ahead every wait lasted ten minutes
 * more. A host whose clock is wrong does neither: its kernel waits on the same
 * wrong clock it reads. So this library shifts both sides the same way:
 *
 * - every read of a wall clock (CLOCK_REALTIME and its variants) is moved by
 *   the offset;
 * - every wait until an absolute wall-clock time is moved back by it before the
 *   kernel sees it, so it lasts as long as the process meant.
 *
 * The monotonic clocks are left alone: a host with a wrong clock still counts
 * seconds at the right pace, and tokio's timers and librdkafka's own clock
 * (rd_clock) run on them.
 *
 * This is the one piece of the project in C: it replaces libc's functions inside
 * another process, where the Rust runtime of a second copy of std would not be
 * welcome. Built by sagactl's build.rs and embedded in sagactl.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <sys/time.h>
#include <threads.h>
#include <time.h>

static long long shift_secs;

__attribute__((constructor)) static void read_shift(void) {
    const char *value = getenv("CLOCK_SHIFT_SECS");
    shift_secs = value != NULL ? strtoll(value, NULL, 10) : 0;
}

/* The next definition of a function (libc's), looked up once. glibc keeps two
 * versions of pthread_cond_timedwait; the current one has the condition
 * variable layout the program was compiled against. */
#define REAL(name) REAL_FROM(name, dlsym(RTLD_NEXT, #name))
#define REAL_VERSION(name, version)                                            \
    REAL_FROM(name, dlvsym(RTLD_NEXT, #name, version))
#define REAL_FROM(name, lookup)                                                \
    static __typeof__(name) *real = NULL;                                      \
    if (__atomic_load_n(&real, __ATOMIC_ACQUIRE) == NULL) {                    \
        __atomic_store_n(&real, (__typeof__(name) *)(lookup), __ATOMIC_RELEASE); \
    }

static int is_wall_clock(clockid_t clock) {
    return clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE ||
           clock == CLOCK_REALTIME_ALARM || clock == CLOCK_TAI;
}

/* Wall-clock time as the process sees it -> as the kernel counts it. */
static struct timespec to_kernel(const struct timespec *seen) {
    struct timespec kernel = *seen;
    kernel.tv_sec -= shift_secs;
    return kernel;
}

int clock_gettime(clockid_t clock, struct timespec *now) {
    REAL(clock_gettime);
    int result = real(clock, now);
    if (result == 0 && is_wall_clock(clock)) {
        now->tv_sec += shift_secs;
    }
    return result;
}

int gettimeofday(struct timeval *restrict now, void *restrict zone) {
    REAL(gettimeofday);
    int result = real(now, zone);
    if (result == 0) {
        now->tv_sec += shift_secs;
    }
    return result;
}

time_t time(time_t *now) {
    REAL(time);
    time_t seconds = real(NULL);
    if (seconds != (time_t)-1) {
        seconds += shift_secs;
    }
    if (now != NULL) {
        *now = seconds;
    }
    return seconds;
}

int timespec_get(struct timespec *now, int base) {
    REAL(timespec_get);
    int result = real(now, base);
    if (result == TIME_UTC) {
        now->tv_sec += shift_secs;
    }
    return result;
}

/* glibc keeps a condition variable's clock in bit 1 of __wrefs
 * (__PTHREAD_COND_CLOCK_MONOTONIC_MASK); pthread_condattr_setclock sets it. A
 * default condition variable, like librdkafka's, waits on CLOCK_REALTIME. */
static int waits_on_wall_clock(const pthread_cond_t *cond) {
    return (__atomic_load_n(&cond->__data.__wrefs, __ATOMIC_RELAXED) & 2) == 0;
}

int pthread_cond_timedwait(pthread_cond_t *restrict cond,
                           pthread_mutex_t *restrict mutex,
                           const struct timespec *restrict deadline) {
    REAL_VERSION(pthread_cond_timedwait, "GLIBC_2.3.2");
    if (!waits_on_wall_clock(cond)) {
        return real(cond, mutex, deadline);
    }
    struct timespec kernel = to_kernel(deadline);
    return real(cond, mutex, &kernel);
}

int pthread_cond_clockwait(pthread_cond_t *restrict cond,
                           pthread_mutex_t *restrict mutex, clockid_t clock,
                           const struct timespec *restrict deadline) {
    REAL(pthread_cond_clockwait);
    if (!is_wall_clock(clock)) {
        return real(cond, mutex, clock, deadline);
    }
    struct timespec kernel = to_kernel(deadline);
    return real(cond, mutex, clock, &kernel);
}

/* C11 threads: glibc's cnd_timedwait calls its condition variable code
 * directly, not through pthread_cond_timedwait above. Its clock is always
 * CLOCK_REALTIME. */
int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mutex,
                  const struct timespec *restrict deadline) {
    REAL(cnd_timedwait);
    struct timespec kernel = to_kernel(deadline);
    return real(cond, mutex, &kernel);
}

int pthread_mutex_timedlock(pthread_mutex_t *restrict mutex,
                            const struct timespec *restrict deadline) {
    REAL(pthread_mutex_timedlock);
    struct timespec kernel = to_kernel(deadline);
    return real(mutex, &kernel);
}

int sem_timedwait(sem_t *restrict semaphore,
                  const struct timespec *restrict deadline) {
    REAL(sem_timedwait);
    struct timespec kernel = to_kernel(deadline);
    return real(semaphore, &kernel);
}

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request,
                    struct timespec *remaining) {
    REAL(clock_nanosleep);
    if (!(flags & TIMER_ABSTIME) || !is_wall_clock(clock) || request == NULL) {
        return real(clock, flags, request, remaining);
    }
    struct timespec kernel = to_kernel(request);
    return real(clock, flags, &kernel, remaining);
}
