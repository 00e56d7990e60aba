/* LOOKUP (and GETATTR) in lower-only directories, answered by the reader thread.
 *
 * A first import in a fresh mount sends ~2 LOOKUPs per module (`__pycache__/`, then the
 * .pyc: importlib never lists `__pycache__`), and reading a tree one LOOKUP per file: each
 * a round trip through the trio loop, ~150 us of daemon CPU all in. A directory that only
 * the lower layer fills cannot change without the daemon knowing (every change goes
 * through it), so when the daemon answers the first LOOKUP in one it publishes all its
 * entries here (files and subdirectories), and the reader answers the next LOOKUPs (and the
 * GETATTRs of those nodes) itself, the names it does not hold too: an import probes three
 * extension-module names per package before it finds `__init__.py`.
 *
 * The daemon stays in charge: it stops a directory before anything in it changes (create,
 * unlink, rename, copy-up of a file or of the directory, reset, reload), and it adds the
 * lookups the reader answered for a node to its own count when the kernel forgets it (the
 * kernel's FORGET counts every LOOKUP answer, whoever gave it).
 *
 * The READs of published files are answered from their store objects in _fuse_fastread.c,
 * which asks here for what to read ahead (the directories a walk reads next).
 */
#define _GNU_SOURCE /* O_NOATIME */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_fuse_reader.h"

#define FUSE_LOOKUP_OPCODE 1
#define FUSE_READDIRPLUS_OPCODE 44
#define DIRENTPLUS_NAME 152 /* fuse_entry_out, then fuse_dirent's ino, off, namelen, type */
#define BUCKETS 65536 /* a power of two */
#define READ_AHEAD_FILES 64 /* store objects queued at one directory's first READ */
#define READ_AHEAD_DIRS 32  /* directories looked at for them */
#define WALK_UP_MAX 64      /* levels climbed to find the next directory */
#define READ_AHEAD_MEMORY_MS 1000 /* a directory read ahead longer ago is read ahead again */
#define DT_DIR_TYPE 4

struct dentry { /* a published name */
    struct dentry *next;    /* hash chain */
    struct dentry *sibling; /* the directory's other published names */
    uint64_t parent, ino;
    struct {
        struct cowfs_out_header h;
        unsigned char entry_out[COWFS_ENTRY_OUT_SIZE];
    } reply;
    size_t namelen, sourcelen; /* source: the backing file's path, after the name */
    char name[];
};
struct pdir { /* a published directory */
    uint64_t ino;
    struct dentry *first;
    struct pdir *next;
    unsigned char *plus; /* its READDIRPLUS records (fuse_direntplus), once listed */
    uint32_t *at;        /* where record k (offset k + 1) starts in plus; at[n]: the end */
    uint32_t n;
    uint64_t parent; /* from the parent's listing (0: not listed): a walk's order */
    uint64_t ahead_ms; /* when its files' store objects were queued (_fuse_prefetch.c) */
    uint64_t seen_ms;  /* when one of its files was last read through here */
    int complete;      /* every name is published: the others do not exist */
};
struct counted { /* a node the reader answered lookups of */
    uint64_t ino;
    uint64_t lookups;      /* not yet taken by the daemon */
    struct dentry *dentry; /* while published: its attributes answer GETATTR */
    struct counted *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct dentry *dentries[BUCKETS];
static struct pdir *pdirs[BUCKETS];
static struct counted *counts[BUCKETS];
static unsigned long n_dentries, lookups_answered, attrs_answered, listings_answered,
    negatives_answered;
static struct { /* the answer to a LOOKUP of a name a complete directory does not hold */
    struct cowfs_out_header h;
    unsigned char entry_out[COWFS_ENTRY_OUT_SIZE]; /* nodeid 0: the kernel caches the absence */
} negative;

static unsigned ino_bucket(uint64_t ino)
{
    return (unsigned)((ino * UINT64_C(0x9e3779b97f4a7c15)) >> 48) & (BUCKETS - 1);
}

static unsigned name_bucket(uint64_t parent, const char *name, size_t len)
{
    uint64_t h = UINT64_C(1469598103934665603) ^ parent;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)name[i]) * UINT64_C(1099511628211);
    return (unsigned)(h >> 32) & (BUCKETS - 1);
}

static struct counted **count_slot(uint64_t ino)
{
    struct counted **c = &counts[ino_bucket(ino)];
    while (*c != NULL && (*c)->ino != ino)
        c = &(*c)->next;
    return c;
}

static struct counted *counted(uint64_t ino) /* found or made; NULL: out of memory */
{
    struct counted **c = count_slot(ino);
    if (*c == NULL) {
        *c = calloc(1, sizeof **c);
        if (*c != NULL)
            (*c)->ino = ino;
    }
    return *c;
}

static void drop_counted_if_idle(uint64_t ino)
{
    struct counted **c = count_slot(ino);
    if (*c != NULL && (*c)->lookups == 0 && (*c)->dentry == NULL) {
        struct counted *gone = *c;
        *c = gone->next;
        free(gone);
    }
}

static struct pdir **pdir_slot(uint64_t ino)
{
    struct pdir **p = &pdirs[ino_bucket(ino)];
    while (*p != NULL && (*p)->ino != ino)
        p = &(*p)->next;
    return p;
}

static struct pdir *pdir_made(uint64_t ino) /* found or made (mu held); NULL: no memory */
{
    struct pdir **p = pdir_slot(ino);
    if (*p == NULL && (*p = calloc(1, sizeof **p)) != NULL)
        (*p)->ino = ino;
    return *p;
}

static struct dentry *find(uint64_t parent, const char *name, size_t len)
{
    struct dentry *d = dentries[name_bucket(parent, name, len)];
    while (d != NULL && !(d->parent == parent && d->namelen == len &&
                          memcmp(d->name, name, len) == 0))
        d = d->next;
    return d;
}

int cowfs_lookup_answer(int dev_fd, const void *mem, size_t n)
{
    const struct cowfs_in_header *in = mem;
    if (in->opcode != FUSE_LOOKUP_OPCODE || n <= sizeof *in)
        return 0;
    const char *name = (const char *)(in + 1);
    size_t len = strnlen(name, n - sizeof *in);
    int answered = 0;
    pthread_mutex_lock(&mu);
    struct dentry *d = find(in->nodeid, name, len);
    struct counted *c = d != NULL ? counted(d->ino) : NULL;
    struct pdir *p = d == NULL ? *pdir_slot(in->nodeid) : NULL;
    if (c != NULL) {
        c->lookups++; /* before the answer: a FORGET can only follow it */
        d->reply.h.unique = in->unique;
        if (write(dev_fd, &d->reply, sizeof d->reply) < 0)
            c->lookups--; /* interrupted: the kernel did not take it */
        else
            lookups_answered++;
        answered = 1;
    } else if (p != NULL && p->complete) {
        negative.h = (struct cowfs_out_header){sizeof negative, 0, in->unique};
        if (write(dev_fd, &negative, sizeof negative) >= 0)
            negatives_answered++;
        answered = 1;
    }
    pthread_mutex_unlock(&mu);
    return answered;
}

/* fuse_attr_out from a published name's fuse_entry_out. */
static void attr_of(const struct dentry *d, unsigned char attr_out[COWFS_ATTR_OUT_SIZE])
{
    memcpy(attr_out, d->reply.entry_out + 24, 8);      /* attr_valid */
    memcpy(attr_out + 8, d->reply.entry_out + 36, 4);  /* attr_valid_nsec */
    memset(attr_out + 12, 0, 4);                       /* dummy */
    memcpy(attr_out + 16, d->reply.entry_out + 40, COWFS_ATTR_OUT_SIZE - 16); /* attr */
}

int cowfs_lookup_getattr(int dev_fd, const struct cowfs_in_header *in)
{
    pthread_mutex_lock(&mu);
    struct counted *c = *count_slot(in->nodeid);
    struct dentry *d = c != NULL ? c->dentry : NULL;
    if (d != NULL) {
        struct {
            struct cowfs_out_header h;
            unsigned char attr_out[COWFS_ATTR_OUT_SIZE];
        } out;
        out.h = (struct cowfs_out_header){sizeof out, 0, in->unique};
        attr_of(d, out.attr_out);
        if (write(dev_fd, &out, sizeof out) < 0) { /* ENOENT: interrupted */
        }
        attrs_answered++;
    }
    pthread_mutex_unlock(&mu);
    return d != NULL;
}

/* The published backing path of ino into path (mu held); 0 when it has none. */
static int source_of(uint64_t ino, char *path, size_t size)
{
    struct counted *c = *count_slot(ino);
    struct dentry *d = c != NULL ? c->dentry : NULL;
    if (d == NULL || d->sourcelen == 0 || d->sourcelen >= size)
        return 0;
    memcpy(path, d->name + d->namelen, d->sourcelen);
    path[d->sourcelen] = '\0';
    return 1;
}

int cowfs_lookup_source(uint64_t ino, char *path, size_t size,
                        unsigned char attr_out[COWFS_ATTR_OUT_SIZE])
{
    pthread_mutex_lock(&mu);
    int found = source_of(ino, path, size);
    if (found)
        attr_of((*count_slot(ino))->dentry, attr_out);
    pthread_mutex_unlock(&mu);
    return found;
}

static uint32_t namelen_at(const unsigned char *record)
{
    uint32_t len;
    memcpy(&len, record + DIRENTPLUS_NAME - 8, sizeof len); /* fuse_dirent.namelen */
    return len;
}

static int is_dot(const unsigned char *record)
{
    uint32_t len = namelen_at(record);
    const unsigned char *name = record + DIRENTPLUS_NAME;
    return (len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.');
}

/* The nodeid of a listing record that is a subdirectory (0: it is not one, or a dot). */
static uint64_t subdir_at(const unsigned char *record)
{
    uint32_t type;
    uint64_t ino;
    memcpy(&type, record + DIRENTPLUS_NAME - 4, sizeof type); /* fuse_dirent.type */
    memcpy(&ino, record, sizeof ino);                         /* fuse_entry_out.nodeid */
    return type == DT_DIR_TYPE && !is_dot(record) ? ino : 0;
}

/* The first published subdirectory of p listed after the one numbered after (0: from the
 * start); NULL: none. (mu held) */
static struct pdir *subdir_after(const struct pdir *p, uint64_t after)
{
    int past = after == 0;
    for (uint32_t k = 0; p->plus != NULL && k < p->n; k++) {
        uint64_t ino = subdir_at(p->plus + p->at[k]);
        struct pdir *sub;
        if (ino == 0)
            continue;
        if (past && (sub = *pdir_slot(ino)) != NULL)
            return sub;
        past = past || ino == after;
    }
    return NULL;
}

/* The directory a top-down walk reads after d (os.walk, find, a tree copy: depth first,
 * in listing order), among published ones; NULL: none known. (mu held) */
static struct pdir *walk_next(struct pdir *d)
{
    struct pdir *next = subdir_after(d, 0);
    for (int up = 0; next == NULL && d->parent != 0 && up < WALK_UP_MAX; up++) {
        struct pdir *parent = *pdir_slot(d->parent);
        if (parent == NULL)
            return NULL;
        next = subdir_after(parent, d->ino);
        d = parent;
    }
    return next;
}

/* Whether a mark is recent: after that, pages may be gone again. */
static int fresh(uint64_t mark, uint64_t now)
{
    return mark != 0 && now - mark < READ_AHEAD_MEMORY_MS;
}

static int recent(uint64_t *mark, uint64_t now) /* fresh, and renewed */
{
    int was = fresh(*mark, now);
    *mark = now;
    return was;
}

/* Queue the store objects of dir's published files but skip (mu held); how many. */
static int queue_files(struct pdir *dir, uint64_t skip)
{
    struct dentry *files[READ_AHEAD_FILES];
    int n = 0;
    for (struct dentry *d = dir->first; d != NULL && n < READ_AHEAD_FILES; d = d->sibling)
        if (d->ino != skip && d->sourcelen > 0)
            files[n++] = d;
    for (int k = n - 1; k >= 0; k--) { /* in the order published, the listing's */
        uint64_t size;
        memcpy(&size, files[k]->reply.entry_out + 48, sizeof size); /* fuse_attr.size */
        cowfs_readahead(files[k]->name + files[k]->namelen, files[k]->sourcelen, size);
    }
    return n;
}

/* At a file's first READ (or first open): read ahead the store objects of the directory's
 * other files, then of the directories a walk reads next, until READ_AHEAD_FILES are
 * queued. Each directory's first READ moves that frontier on. (mu held) */
static void read_ahead_from(uint64_t ino, int cold)
{
    struct counted *c = *count_slot(ino);
    struct pdir *d = c != NULL && c->dentry != NULL ? *pdir_slot(c->dentry->parent) : NULL;
    if (d == NULL || !cowfs_readahead_on())
        return;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000 + 1;
    /* Only where the disk is read: a cold file, or a directory read ahead before (the
     * stream goes on). A warm store (a first import in a new venv) costs nothing. */
    if ((!cold && !fresh(d->ahead_ms, now)) || recent(&d->seen_ms, now))
        return;
    /* Past this directory only if it was listed: a walk lists every directory, an import
     * never lists __pycache__ (and the modules next door would be read for nothing). */
    int queued = 0, dirs = d->plus != NULL ? READ_AHEAD_DIRS : 1;
    for (int k = 0; d != NULL && k < dirs && queued < READ_AHEAD_FILES; k++) {
        if (!recent(&d->ahead_ms, now))
            queued += queue_files(d, ino);
        d = walk_next(d);
    }
}

void cowfs_lookup_read_ahead(uint64_t ino, int cold)
{
    pthread_mutex_lock(&mu);
    read_ahead_from(ino, cold);
    pthread_mutex_unlock(&mu);
}

int cowfs_dir_add(uint64_t parent, const char *name, size_t len, uint64_t ino,
                  const unsigned char entry_out[COWFS_ENTRY_OUT_SIZE], const char *source,
                  size_t source_len)
{
    int ok = 0;
    pthread_mutex_lock(&mu);
    struct pdir *dir = pdir_made(parent);
    struct dentry *there = dir != NULL ? find(parent, name, len) : NULL;
    struct counted *c = dir != NULL && there == NULL ? counted(ino) : NULL;
    struct dentry *d = c != NULL ? malloc(sizeof *d + len + source_len) : NULL;
    if (c != NULL && d == NULL)
        drop_counted_if_idle(ino);
    if (d != NULL) {
        unsigned b = name_bucket(parent, name, len);
        d->next = dentries[b];
        dentries[b] = d;
        d->sibling = dir->first;
        dir->first = d;
        d->parent = parent;
        d->ino = ino;
        d->reply.h = (struct cowfs_out_header){sizeof d->reply, 0, 0};
        memcpy(d->reply.entry_out, entry_out, COWFS_ENTRY_OUT_SIZE);
        d->namelen = len;
        memcpy(d->name, name, len);
        d->sourcelen = source_len;
        memcpy(d->name + len, source, source_len);
        c->dentry = d;
        n_dentries++;
        ok = 1;
    } else if (there != NULL && there->ino == ino) {
        ok = 2;
    }
    pthread_mutex_unlock(&mu);
    return ok;
}

int cowfs_dir_complete(uint64_t parent,
                       const unsigned char negative_entry_out[COWFS_ENTRY_OUT_SIZE])
{
    pthread_mutex_lock(&mu);
    struct pdir *p = pdir_made(parent);
    if (p != NULL) {
        memcpy(negative.entry_out, negative_entry_out, COWFS_ENTRY_OUT_SIZE);
        p->complete = 1;
    }
    pthread_mutex_unlock(&mu);
    return p != NULL;
}

int cowfs_dir_listing(uint64_t parent, const unsigned char *records, size_t len)
{
    uint32_t n = 0;
    for (size_t pos = 0; pos < len; n++) { /* check the records before taking them */
        if (len - pos < DIRENTPLUS_NAME || len > UINT32_MAX)
            return -1;
        pos += (DIRENTPLUS_NAME + namelen_at(records + pos) + 7) & ~(size_t)7;
        if (pos > len)
            return -1;
    }
    unsigned char *plus = malloc(len > 0 ? len : 1);
    uint32_t *at = malloc((n + 1) * sizeof *at);
    if (plus == NULL || at == NULL) {
        free(plus);
        free(at);
        return 0;
    }
    memcpy(plus, records, len);
    size_t pos = 0;
    for (uint32_t k = 0; k <= n; k++) {
        at[k] = (uint32_t)pos;
        if (k < n)
            pos += (DIRENTPLUS_NAME + namelen_at(plus + pos) + 7) & ~(size_t)7;
    }
    pthread_mutex_lock(&mu);
    struct pdir *p = pdir_made(parent);
    if (p != NULL) {
        free(p->plus);
        free(p->at);
        p->plus = plus;
        p->at = at;
        p->n = n;
        for (uint32_t k = 0; k < n; k++) { /* its subdirectories learn their parent */
            uint64_t sub = subdir_at(plus + at[k]);
            struct pdir *child = sub != 0 && sub != parent ? pdir_made(sub) : NULL;
            if (child != NULL)
                child->parent = parent;
        }
    }
    pthread_mutex_unlock(&mu);
    if (p == NULL) {
        free(plus);
        free(at);
    }
    return p != NULL;
}

/* Count (add 1) or uncount (add -1) the lookup of every entry in records [first, end) but
 * the dots: the kernel counts one for each (fuse_direntplus_link). (mu held) */
static int count_entries(const struct pdir *p, uint32_t first, uint32_t end, int add)
{
    for (uint32_t k = first; k < end; k++) {
        const unsigned char *record = p->plus + p->at[k];
        uint64_t ino;
        memcpy(&ino, record, sizeof ino); /* fuse_entry_out.nodeid */
        if (ino == 0 || is_dot(record))
            continue;
        struct counted *c = counted(ino);
        if (c == NULL) { /* out of memory: take back what this answer counted so far */
            count_entries(p, first, k, -add);
            return 0;
        }
        c->lookups += (uint64_t)(int64_t)add;
        if (add < 0)
            drop_counted_if_idle(ino);
    }
    return 1;
}

int cowfs_dir_read(int dev_fd, const void *mem, size_t n)
{
    const struct cowfs_in_header *in = mem;
    if (in->opcode != FUSE_READDIRPLUS_OPCODE || n < sizeof *in + sizeof(struct cowfs_read_in))
        return 0;
    const struct cowfs_read_in *arg = (const struct cowfs_read_in *)(in + 1);
    if (arg->fh != 0) /* a directory the daemon opened itself */
        return 0;
    pthread_mutex_lock(&mu);
    struct pdir *p = *pdir_slot(in->nodeid);
    int answered = 0;
    if (p != NULL && p->plus != NULL) {
        uint32_t first = arg->offset < p->n ? (uint32_t)arg->offset : p->n, end = first;
        while (end < p->n && p->at[end + 1] - p->at[first] <= arg->size)
            end++;
        /* (a record that does not fit an empty reply would read as the end: the daemon's) */
        if ((end > first || first == p->n) && count_entries(p, first, end, 1)) {
            struct cowfs_out_header h = {
                (uint32_t)(sizeof h + p->at[end] - p->at[first]), 0, in->unique};
            struct iovec iov[2] = {{&h, sizeof h},
                                   {p->plus + p->at[first], p->at[end] - p->at[first]}};
            /* Under the lock, as a LOOKUP: a stop meanwhile sees these lookups counted. */
            if (writev(dev_fd, iov, 2) < 0)
                count_entries(p, first, end, -1); /* interrupted: the kernel took none */
            else
                listings_answered++;
            answered = 1;
        }
    }
    pthread_mutex_unlock(&mu);
    return answered;
}

static void unpublish(struct pdir **p) /* (mu held) */
{
    struct pdir *dir = *p;
    free(dir->plus);
    free(dir->at);
    for (struct dentry *d = dir->first, *next; d != NULL; d = next) {
        next = d->sibling;
        struct dentry **chain = &dentries[name_bucket(d->parent, d->name, d->namelen)];
        while (*chain != d)
            chain = &(*chain)->next;
        *chain = d->next;
        struct counted *c = *count_slot(d->ino);
        if (c != NULL && c->dentry == d) {
            c->dentry = NULL;
            drop_counted_if_idle(d->ino);
        }
        free(d);
        n_dentries--;
    }
    *p = dir->next;
    free(dir);
}

void cowfs_dir_stop(uint64_t parent)
{
    pthread_mutex_lock(&mu);
    struct pdir **p = pdir_slot(parent);
    if (*p != NULL)
        unpublish(p);
    pthread_mutex_unlock(&mu);
}

void cowfs_dir_stop_all(void)
{
    pthread_mutex_lock(&mu);
    for (unsigned i = 0; i < BUCKETS; i++)
        while (pdirs[i] != NULL)
            unpublish(&pdirs[i]);
    pthread_mutex_unlock(&mu);
}

uint64_t cowfs_lookups_of(uint64_t ino, int take)
{
    pthread_mutex_lock(&mu);
    struct counted *c = *count_slot(ino);
    uint64_t n = c != NULL ? c->lookups : 0;
    if (take && c != NULL) {
        c->lookups = 0;
        drop_counted_if_idle(ino);
    }
    pthread_mutex_unlock(&mu);
    return n;
}

void cowfs_lookup_totals(unsigned long *published, unsigned long *lookups,
                         unsigned long *negatives, unsigned long *attrs, unsigned long *reads,
                         unsigned long *listings)
{
    pthread_mutex_lock(&mu);
    *published = n_dentries;
    *lookups = lookups_answered;
    *negatives = negatives_answered;
    *attrs = attrs_answered;
    *reads = cowfs_reads_answered();
    *listings = listings_answered;
    pthread_mutex_unlock(&mu);
}
