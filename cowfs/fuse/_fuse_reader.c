/* A C thread that reads /dev/fuse for the pyfuse3 loop and answers FUSE_IOCTL itself.
 *
 * CPython 3.10-3.13 opens each module it imports with io.open(), which asks isatty(): an
 * ioctl(TCGETS) that the kernel forwards to the daemon (FUSE cannot decline ioctls once and
 * for all). cowfs implements no ioctl and libfuse answers ENOSYS, but that round trip goes
 * through the trio loop: ~45 us, ~1,800 times per import of the bench workload, most of what
 * a warm import through the mount costs more than a native one. A thread blocked in read()
 * answers the same ENOSYS in a few microseconds, without waking Python.
 *
 * Every other request goes to the pyfuse3 loop unchanged: pyfuse3 waits on an eventfd (what
 * fuse_session_fd() returns to it once the reader runs) and fuse_session_receive_buf() takes
 * the next request from a small ring, swapping buffers (no copy). The end of the connection is
 * passed on as libfuse passes it: ENODEV exits the session and returns 0.
 *
 * The thread reads and writes through its own dup of the session fd, so the INIT reply
 * capture in _fuse_shim.c (which briefly swaps the session fd number) never affects it, and a
 * closed session fd number reused by something else is never written to.
 */
#define _GNU_SOURCE /* dlvsym */
#define FUSE_USE_VERSION 32
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "_fuse_reader.h"

#define RING 16
#define FUSE_IOCTL_OPCODE 39
#define FUSE_RELEASE_OPCODE 18
#define IOCTL_DIR_FLAG (1U << 4) /* FUSE_IOCTL_DIR: libfuse decides those by its capabilities */
/* libfuse 3.14's receive buffer (what it negotiates max_write from): FUSE_MAX_MAX_PAGES pages
 * of data plus a page of headers. */
#define BUFSIZE ((size_t)(256 + 1) * (size_t)sysconf(_SC_PAGESIZE))

struct ioctl_in { /* fuse_ioctl_in */
    uint64_t fh;
    uint32_t flags, cmd;
    uint64_t arg;
    uint32_t in_size, out_size;
};

static int wanted, started; /* one reader per process: the daemon has one session */
static struct fuse_session *reading; /* the session the thread reads for */
static int dev_fd = -1, event_fd = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static struct {
    void *mem;
    size_t size;
} ring[RING];
static unsigned head, count;
static int ended;              /* the errno that ended reading; 0 while it goes on */
static unsigned long answered; /* ioctls answered here (read by tests through Python) */

static void *dlsym_libfuse(const char *name)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    return libfuse == NULL ? NULL : dlvsym(libfuse, name, "FUSE_3.0");
}

int cowfs_real_session_fd(struct fuse_session *se)
{
    static int (*real)(struct fuse_session *);
    if (real == NULL)
        real = (int (*)(struct fuse_session *))dlsym_libfuse("fuse_session_fd");
    return real(se);
}

/* Answered here: an ioctl on a file (what isatty() sends), with libfuse's answer. */
static int answer_here(const void *mem, ssize_t n)
{
    const struct cowfs_in_header *in = mem;
    if ((size_t)n < sizeof *in + sizeof(struct ioctl_in) || in->opcode != FUSE_IOCTL_OPCODE)
        return 0;
    const struct ioctl_in *arg = (const struct ioctl_in *)(in + 1);
    if (arg->flags & IOCTL_DIR_FLAG)
        return 0;
    struct cowfs_out_header out = {sizeof out, -ENOSYS, in->unique};
    if (write(dev_fd, &out, sizeof out) < 0 && errno != ENOENT)
        return 0; /* (ENOENT: the caller was interrupted meanwhile) let libfuse try */
    __atomic_add_fetch(&answered, 1, __ATOMIC_RELAXED);
    return 1;
}

/* After a request answered here, poll /dev/fuse for a while before sleeping in read(): waking
 * a sleeping thread costs tens of microseconds on VMs that halt idle vCPUs (more than the C
 * answer itself), and an import or a tree walk sends the next request within microseconds.
 * Up to spin_max_ns per request (COWFS_READER_SPIN_US, 0: off; never with one CPU); after
 * POLL_MISSES polls in a row that waited in vain, none for PAUSE_NS. After a RELEASE only
 * while that pays: it ends an open-read-close, and the next open comes at once in a tree
 * read but a module's execution later in an import (polling for it there burnt ~0.2 s of
 * CPU per warm import of the bench workload with passthrough opens); one RELEASE in
 * RELEASE_PROBE polls again to notice a change. */
#define RELEASE_PROBE 16
#define POLL_MISSES 8
#define PAUSE_NS 10000000L /* 10 ms: at most 8 polls in vain (400 us) per pause, 4% of a CPU */
static long spin_max_ns;

static long elapsed_ns(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* 1 when a request came within ns. */
static int poll_busy(long ns)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct pollfd p = {dev_fd, POLLIN, 0};
    do {
        if (poll(&p, 1, 0) != 0)
            return 1;
    } while (elapsed_ns(&t0) < ns);
    return 0;
}

static void end_reading(int err)
{
    uint64_t forever = UINT64_C(1) << 40; /* the eventfd stays readable for every waiter */
    pthread_mutex_lock(&mu);
    ended = err;
    pthread_mutex_unlock(&mu);
    if (write(event_fd, &forever, sizeof forever) < 0) { /* nothing else to tell anyone */
    }
}

static void *reader_main(void *unused)
{
    (void)unused;
    const char *env = getenv("COWFS_READER_SPIN_US");
    spin_max_ns = (env != NULL ? atol(env) : 50) * 1000L;
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2)
        spin_max_ns = 0; /* polling would only hold up the client it waits for */
    int misses = 0;                                 /* polls in a row that waited in vain */
    struct timespec paused = {0, 0};                /* when polling last gave up */
    void *mem = malloc(BUFSIZE);
    if (mem == NULL) {
        end_reading(ENOMEM);
        return NULL;
    }
    int spin = 0; /* the last request was answered here: the next one may come right away */
    int released = 0;      /* ... and it was a RELEASE */
    int after_release = 1; /* the last poll after a RELEASE found a request */
    unsigned releases = 0;
    for (;;) {
        int poll_now = spin && spin_max_ns > 0 &&
                       (misses < POLL_MISSES || elapsed_ns(&paused) > PAUSE_NS) &&
                       (!released || after_release || ++releases % RELEASE_PROBE == 0);
        if (poll_now) {
            int hit = poll_busy(spin_max_ns);
            if (released)
                after_release = hit;
            if (hit) {
                misses = 0;
            } else if (++misses >= POLL_MISSES) {
                clock_gettime(CLOCK_MONOTONIC, &paused); /* none for PAUSE_NS, then try again */
            }
        }
        ssize_t n = read(dev_fd, mem, BUFSIZE);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue; /* ENOENT: a request interrupted before it was read */
            end_reading(errno);
            break;
        }
        int here = answer_here(mem, n) || cowfs_fast_answer(dev_fd, mem, (size_t)n) ||
                   cowfs_lookup_answer(dev_fd, mem, (size_t)n) ||
                   cowfs_lookup_read(dev_fd, mem, (size_t)n) ||
                   cowfs_dir_read(dev_fd, mem, (size_t)n);
        spin = here;
        released = ((const struct cowfs_in_header *)mem)->opcode == FUSE_RELEASE_OPCODE;
        if (here)
            continue;
        pthread_mutex_lock(&mu);
        while (count == RING)
            pthread_cond_wait(&not_full, &mu);
        unsigned slot = (head + count) % RING;
        void *spare = ring[slot].mem;
        ring[slot].mem = mem;
        ring[slot].size = (size_t)n;
        count++;
        uint64_t one = 1;
        if (write(event_fd, &one, sizeof one) < 0) { /* cannot fail below 2^64-1 */
        }
        pthread_mutex_unlock(&mu);
        mem = spare != NULL ? spare : malloc(BUFSIZE);
        if (mem == NULL) {
            end_reading(ENOMEM);
            break;
        }
    }
    free(mem);
    close(dev_fd);
    return NULL;
}

/* pyfuse3 asks once, right after mounting; from then on it waits on the eventfd. */
int fuse_session_fd(struct fuse_session *se)
{
    int fd = cowfs_real_session_fd(se);
    if (reading == se)
        return event_fd;
    if (!wanted || started || fd < 0)
        return fd;
    dev_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    event_fd = eventfd(0, EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* Signals stay with Python's main thread: the reader starts with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int failed = dev_fd < 0 || event_fd < 0 ||
                 pthread_create(&thread, &attr, reader_main, NULL) != 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (failed) {
        if (dev_fd >= 0)
            close(dev_fd);
        if (event_fd >= 0)
            close(event_fd);
        dev_fd = event_fd = -1;
        pthread_attr_destroy(&attr);
        return fd; /* plain libfuse reads, as without the reader */
    }
    pthread_attr_destroy(&attr);
    started = 1;
    reading = se;
    return event_fd;
}

void fuse_session_destroy(struct fuse_session *se)
{
    static void (*real)(struct fuse_session *);
    if (real == NULL)
        real = (void (*)(struct fuse_session *))dlsym_libfuse("fuse_session_destroy");
    if (se == reading)
        reading = NULL; /* (the thread ends with the connection: ENODEV) */
    real(se);
}

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    static int (*real)(struct fuse_session *, struct fuse_buf *);
    if (se == NULL || se != reading) {
        if (real == NULL)
            real = (int (*)(struct fuse_session *, struct fuse_buf *))dlsym_libfuse(
                "fuse_session_receive_buf");
        return real(se, buf);
    }
    pthread_mutex_lock(&mu);
    if (count == 0) {
        int err = ended;
        pthread_mutex_unlock(&mu);
        if (err == ENODEV) {
            fuse_session_exit(se);
            return 0;
        }
        return err ? -err : -EINTR; /* -EINTR: woken for nothing, pyfuse3 waits again */
    }
    uint64_t one;
    if (read(event_fd, &one, sizeof one) < 0) { /* count > 0: the eventfd is > 0 too */
    }
    void *given = ring[head].mem;
    size_t size = ring[head].size;
    ring[head].mem = buf->mem; /* the caller's old buffer (ours, or NULL) is the next spare */
    head = (head + 1) % RING;
    count--;
    pthread_cond_signal(&not_full);
    pthread_mutex_unlock(&mu);
    buf->mem = given;
    buf->size = size;
    buf->flags = 0;
    buf->pos = 0;
    return (int)size;
}

void cowfs_reader_want(int on)
{
    wanted = on;
}

int cowfs_reader_running(void)
{
    return reading != NULL;
}

unsigned long cowfs_reader_answered(void)
{
    return __atomic_load_n(&answered, __ATOMIC_RELAXED);
}
