/* Passthrough OPEN and RELEASE of store objects, answered by the reader thread.
 *
 * With FUSE passthrough (cowfs/fuse/passthrough.py) the kernel reads a store object itself once an
 * OPEN is answered with its backing id, but every open() and close() still costs an OPEN and
 * a RELEASE round trip, and through the trio loop that is ~100 us each: more than passthrough
 * saves on a warm import. The answer for a lower file that nothing writes is always the same
 * (its backing id), so once the daemon has answered the first OPEN of a node it publishes the
 * node here and the reader thread (_fuse_reader.c) answers the next read-only opens and their
 * releases without waking Python.
 *
 * A passthrough read makes the kernel forget the file's atime, so each fstat() after a read
 * (every `cat`, every import reading a .pyc) asks GETATTR again: the daemon hands over its
 * answer with the entry (a store object's attributes never change while it serves), and the
 * reader answers those too.
 *
 * The daemon stays in charge: an entry is published, held and stopped only by it; the reader
 * only counts the opens it answers (and those the daemon joins to an entry), so that the
 * daemon can refuse a writer while the store object is open (ETXTBSY, as before) and the
 * backing id stays registered while any open uses it. A stopped entry that still has opens
 * drains: the reader answers no more opens from it, and closes its backing id at the last
 * release. Handles the kernel gets for counted opens carry FAST_FH; a RELEASE with more bits
 * than that also goes to the daemon (it holds a handle of its own for that open).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "_fuse_reader.h"

#define FUSE_GETATTR_OPCODE 3
#define FUSE_OPEN_OPCODE 14
#define FUSE_RELEASE_OPCODE 18
#define FAST_FH (UINT64_C(1) << 31) /* below the daemon's PT bits, above its handle numbers */
#define DAEMON_FH_MASK (FAST_FH - 1)
#define BUCKETS 4096 /* a power of two */

struct open_in { /* fuse_open_in */
    uint32_t flags, open_flags;
};
struct release_in { /* fuse_release_in */
    uint64_t fh;
    uint32_t flags, release_flags;
    uint64_t lock_owner;
};
struct open_reply {
    struct cowfs_out_header h;
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};

struct entry {
    uint64_t nodeid;
    int32_t backing_id;
    uint32_t count;   /* counted opens the kernel holds */
    uint32_t pid;     /* the process of the last of them */
    int serving;      /* the reader may answer opens (and GETATTR) with it */
    struct entry *next;
    struct {
        struct cowfs_out_header h;
        unsigned char attr_out[COWFS_ATTR_OUT_SIZE];
    } attr; /* the GETATTR reply (its unique filled in) */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct entry *buckets[BUCKETS];
static unsigned long entries, opens_answered, attrs_answered, first_opened;
static int first_opens; /* the daemon allows first_open() */

static struct entry **slot(uint64_t nodeid)
{
    struct entry **e = &buckets[(nodeid * UINT64_C(0x9e3779b97f4a7c15)) >> 52 & (BUCKETS - 1)];
    while (*e != NULL && (*e)->nodeid != nodeid)
        e = &(*e)->next;
    return e;
}

static void unlink_entry(struct entry **e)
{
    struct entry *gone = *e;
    *e = gone->next;
    free(gone);
    entries--;
}

/* One counted open fewer; a drained entry goes, with its backing id. (mu held) */
static void put(struct entry **e, int dev_fd)
{
    if ((*e)->count > 0)
        (*e)->count--;
    if ((*e)->count == 0 && !(*e)->serving && (*e)->backing_id >= 0) {
        uint32_t id = (uint32_t)(*e)->backing_id;
        if (ioctl(dev_fd, BACKING_CLOSE, &id) < 0) { /* the connection is gone: so is the id */
        }
        unlink_entry(e);
    }
}

/* An entry for a node whose store object was never opened here yet: its published name
 * (_fuse_fastlookup.c) says which file; the reader registers it as a backing file itself.
 * The daemon stops a node's name before its entry (cowfs.fuse.ops._changing), so checking the name
 * again under the lock, after the slow open, makes an entry for a node that changed meanwhile
 * impossible. 1 when the entry is there. */
static int first_open(int dev_fd, uint64_t nodeid)
{
    char path[4096];
    struct {
        struct cowfs_out_header h;
        unsigned char attr_out[COWFS_ATTR_OUT_SIZE];
    } attr;
    if (!cowfs_lookup_source(nodeid, path, sizeof path, attr.attr_out))
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return 0; /* (a lazily installed object not fetched yet...): the daemon's to answer */
    cowfs_opened_read_ahead(nodeid, fd); /* the kernel reads its backing pages next */
    struct backing_map map = {fd, 0, 0};
    int32_t id = ioctl(dev_fd, BACKING_OPEN, &map);
    close(fd);
    if (id < 0)
        return 0;
    char again[4096];
    pthread_mutex_lock(&mu);
    struct entry **e = slot(nodeid);
    struct entry *new = NULL;
    if (*e == NULL && cowfs_lookup_source(nodeid, again, sizeof again, attr.attr_out) &&
        strcmp(path, again) == 0 && (new = calloc(1, sizeof *new)) != NULL) {
        *new = (struct entry){nodeid, id, 0, 0, 1, NULL, {{0}, {0}}};
        new->attr.h.len = sizeof new->attr;
        memcpy(new->attr.attr_out, attr.attr_out, COWFS_ATTR_OUT_SIZE);
        *e = new;
        entries++;
        first_opened++;
    }
    pthread_mutex_unlock(&mu);
    if (new == NULL) {
        uint32_t unused = (uint32_t)id;
        if (ioctl(dev_fd, BACKING_CLOSE, &unused) < 0) { /* (the connection is gone) */
        }
    }
    return 1;
}

int cowfs_fast_answer(int dev_fd, const void *mem, size_t n)
{
    const struct cowfs_in_header *in = mem;
    if (n < sizeof *in)
        return 0;
    if (in->opcode == FUSE_GETATTR_OPCODE) {
        pthread_mutex_lock(&mu);
        struct entry **e = slot(in->nodeid);
        int answered = *e != NULL && (*e)->serving;
        if (answered) {
            (*e)->attr.h.unique = in->unique;
            if (write(dev_fd, &(*e)->attr, sizeof (*e)->attr) < 0) { /* ENOENT: interrupted */
            }
            attrs_answered++;
        }
        pthread_mutex_unlock(&mu);
        return answered || cowfs_lookup_getattr(dev_fd, in);
    }
    if (in->opcode == FUSE_OPEN_OPCODE && n >= sizeof *in + sizeof(struct open_in)) {
        const struct open_in *arg = (const struct open_in *)(in + 1);
        if ((arg->flags & O_ACCMODE) != O_RDONLY || (arg->flags & O_TRUNC))
            return 0;
        pthread_mutex_lock(&mu);
        struct entry **e = slot(in->nodeid);
        if (*e == NULL && first_opens) {
            pthread_mutex_unlock(&mu);
            if (!first_open(dev_fd, in->nodeid))
                return 0;
            pthread_mutex_lock(&mu);
            e = slot(in->nodeid);
        }
        if (*e == NULL || !(*e)->serving) {
            pthread_mutex_unlock(&mu);
            return 0;
        }
        struct open_reply out = {{sizeof out, 0, in->unique}, FAST_FH, FOPEN_PASSTHROUGH_FLAG,
                                 (*e)->backing_id};
        (*e)->count++;
        (*e)->pid = in->pid;
        /* Written under the lock: a stop in between must see this open counted or not sent. */
        ssize_t w = write(dev_fd, &out, sizeof out);
        int err = errno;
        if (w < 0)
            put(e, dev_fd); /* the opener was interrupted: the kernel holds nothing */
        else
            opens_answered++;
        pthread_mutex_unlock(&mu);
        return w >= 0 || err == ENOENT;
    }
    if (in->opcode == FUSE_RELEASE_OPCODE && n >= sizeof *in + sizeof(struct release_in)) {
        const struct release_in *arg = (const struct release_in *)(in + 1);
        if (!(arg->fh & FAST_FH))
            return 0;
        pthread_mutex_lock(&mu);
        struct entry **e = slot(in->nodeid);
        if (*e != NULL)
            put(e, dev_fd);
        pthread_mutex_unlock(&mu);
        if (arg->fh & DAEMON_FH_MASK)
            return 0; /* the daemon's own handle for this open goes too */
        struct cowfs_out_header out = {sizeof out, 0, in->unique};
        if (write(dev_fd, &out, sizeof out) < 0) { /* nobody waits for a RELEASE answer */
        }
        return 1;
    }
    return 0;
}

int cowfs_fast_publish(uint64_t nodeid, int32_t backing_id, uint32_t pid,
                       const unsigned char attr_out[COWFS_ATTR_OUT_SIZE])
{
    pthread_mutex_lock(&mu);
    struct entry **e = slot(nodeid);
    int ok = *e == NULL;
    if (ok) {
        struct entry *new = calloc(1, sizeof *new);
        ok = new != NULL;
        if (ok) {
            *new = (struct entry){nodeid, backing_id, 1, pid, 1, NULL, {{0}, {0}}};
            new->attr.h.len = sizeof new->attr;
            memcpy(new->attr.attr_out, attr_out, COWFS_ATTR_OUT_SIZE);
            *e = new;
            entries++;
        }
    }
    pthread_mutex_unlock(&mu);
    return ok ? 0 : -1;
}

int32_t cowfs_fast_hold(uint64_t nodeid, uint32_t pid, int *serving)
{
    pthread_mutex_lock(&mu);
    struct entry **e = slot(nodeid);
    int32_t id = -1;
    if (*e != NULL && (*e)->backing_id >= 0) {
        (*e)->count++;
        (*e)->pid = pid;
        id = (*e)->backing_id;
        *serving = (*e)->serving;
    }
    pthread_mutex_unlock(&mu);
    return id;
}

int64_t cowfs_fast_stop(uint64_t nodeid, int force, uint32_t pid)
{
    pthread_mutex_lock(&mu);
    struct entry **e = slot(nodeid);
    int64_t r = COWFS_FAST_NONE;
    if (*e != NULL && (*e)->backing_id < 0) { /* a block (cowfs_fast_block) */
        if (force)
            unlink_entry(e);
    } else if (*e != NULL) {
        if ((*e)->count == 0) {
            r = (*e)->backing_id;
            unlink_entry(e);
        } else if (force || ((*e)->count == 1 && (*e)->pid == pid && pid != 0)) {
            (*e)->serving = 0;
            r = COWFS_FAST_DRAINING;
        } else {
            r = COWFS_FAST_BUSY;
        }
    }
    pthread_mutex_unlock(&mu);
    return r;
}

/* The daemon opened ino in cached mode (a writer, or a reader beside one): the kernel refuses
 * a passthrough open of an inode with cached opens (EIO), so no first_open() until unblocked.
 * A block is an entry without backing id that never serves. */
void cowfs_fast_block(uint64_t nodeid, int on)
{
    pthread_mutex_lock(&mu);
    struct entry **e = slot(nodeid);
    if (on && *e == NULL) {
        struct entry *new = calloc(1, sizeof *new);
        if (new != NULL) {
            *new = (struct entry){nodeid, -1, 0, 0, 0, NULL, {{0}, {0}}};
            *e = new;
            entries++;
        }
    } else if (!on && *e != NULL && (*e)->backing_id < 0) {
        unlink_entry(e);
    }
    pthread_mutex_unlock(&mu);
}

void cowfs_fast_first_opens(int on)
{
    pthread_mutex_lock(&mu);
    first_opens = on;
    pthread_mutex_unlock(&mu);
}

void cowfs_fast_stop_all(int dev_fd)
{
    pthread_mutex_lock(&mu);
    for (unsigned i = 0; i < BUCKETS; i++) {
        struct entry **e = &buckets[i];
        while (*e != NULL) {
            (*e)->serving = 0;
            if ((*e)->backing_id < 0) {
                e = &(*e)->next; /* a block: its cached opens are still live */
            } else if ((*e)->count == 0) {
                uint32_t id = (uint32_t)(*e)->backing_id;
                if (ioctl(dev_fd, BACKING_CLOSE, &id) < 0) { /* (the connection is gone) */
                }
                unlink_entry(e);
            } else {
                e = &(*e)->next;
            }
        }
    }
    pthread_mutex_unlock(&mu);
}

void cowfs_fast_totals(unsigned long *n_entries, unsigned long *n_opens,
                       unsigned long *answered, unsigned long *attrs, unsigned long *firsts)
{
    unsigned long opens = 0;
    pthread_mutex_lock(&mu);
    for (unsigned i = 0; i < BUCKETS; i++)
        for (struct entry *e = buckets[i]; e != NULL; e = e->next)
            opens += e->count;
    *n_entries = entries;
    *n_opens = opens;
    *answered = opens_answered;
    *attrs = attrs_answered;
    *firsts = first_opened;
    pthread_mutex_unlock(&mu);
}
