/* READs of published files with kernel opens, answered by the reader from store objects.
 *
 * With kernel opens (no OPEN requests) a READ carries handle 0. A cold read of a tree costs
 * one READ per file, ~210 us through the trio loop against ~70 us of disk. For a file whose
 * name the daemon published (_fuse_fastlookup.c) the reader preads its store object (one fd
 * kept for the last file). A READ that overlaps a stop (copy-up, reload) is checked again
 * after its pread and then left to the daemon; one already answered raced with the change
 * as any read does (the kernel holds the pages it fills locked until the reply, so a later
 * invalidation waits for it). A first READ that finds its object cold starts the read-ahead
 * of what comes next (_fuse_prefetch.c).
 */
#define _GNU_SOURCE /* O_NOATIME, preadv2 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_fuse_reader.h"

#define FUSE_READ_OPCODE 15
#define READ_MAX (UINT32_C(1) << 20) /* above max_read: bigger READs go to the daemon */

/* The reader's last backing file: a file read in several READs is opened once. */
static struct {
    uint64_t ino;
    int fd;
    char path[PATH_MAX];
} last = {0, -1, ""};
static unsigned long answered;

static int source(uint64_t ino, char path[PATH_MAX])
{
    unsigned char attr_out[COWFS_ATTR_OUT_SIZE];
    return cowfs_lookup_source(ino, path, PATH_MAX, attr_out);
}

static int still_source(uint64_t ino, const char *path)
{
    char now[PATH_MAX];
    return source(ino, now) && strcmp(now, path) == 0;
}

/* Read size bytes at offset; *cold: they were not all in the page cache (asked only when
 * something reads ahead: else one plain pread). */
static ssize_t read_noting_cold(int fd, unsigned char *data, size_t size, off_t offset,
                                int *cold)
{
    struct iovec iov = {data, size};
    ssize_t got = cowfs_readahead_on() ? preadv2(fd, &iov, 1, offset, RWF_NOWAIT) : -1;
    *cold = got < 0; /* EAGAIN (or EOPNOTSUPP: no RWF_NOWAIT here) */
    if (*cold)
        return pread(fd, data, size, offset);
    if ((size_t)got < size) { /* part cached, or the end of the file */
        ssize_t more = pread(fd, data + got, size - (size_t)got, offset + got);
        got = more < 0 ? more : got + more;
    }
    return got;
}

int cowfs_lookup_read(int dev_fd, const void *mem, size_t n)
{
    const struct cowfs_in_header *in = mem;
    if (in->opcode != FUSE_READ_OPCODE || n < sizeof *in + sizeof(struct cowfs_read_in))
        return 0;
    const struct cowfs_read_in *arg = (const struct cowfs_read_in *)(in + 1);
    if (arg->fh != 0 || arg->size > READ_MAX) /* fh 0: a kernel open; others are handles */
        return 0;
    char path[PATH_MAX];
    if (!source(in->nodeid, path))
        return 0;
    if (last.fd < 0 || last.ino != in->nodeid || strcmp(last.path, path) != 0) {
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOATIME);
        if (fd < 0 && errno == EPERM) /* O_NOATIME: only the owner (or CAP_FOWNER) */
            fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return 0; /* (a lazy object not fetched yet...) the daemon answers */
        if (last.fd >= 0)
            close(last.fd);
        last.fd = fd;
        last.ino = in->nodeid;
        memcpy(last.path, path, strlen(path) + 1);
    }
    static unsigned char *reply; /* header and data: only the reader thread comes here */
    if (reply == NULL && (reply = malloc(sizeof(struct cowfs_out_header) + READ_MAX)) == NULL)
        return 0;
    int cold;
    ssize_t got = read_noting_cold(last.fd, reply + sizeof(struct cowfs_out_header),
                                   arg->size, (off_t)arg->offset, &cold);
    if (arg->offset == 0)
        cowfs_lookup_read_ahead(in->nodeid, cold);
    if (got < 0 || !still_source(in->nodeid, path))
        return 0;
    struct cowfs_out_header h = {(uint32_t)(sizeof h + (size_t)got), 0, in->unique};
    memcpy(reply, &h, sizeof h);
    if (write(dev_fd, reply, h.len) < 0) { /* ENOENT: interrupted */
    }
    __atomic_add_fetch(&answered, 1, __ATOMIC_RELAXED);
    return 1;
}

void cowfs_opened_read_ahead(uint64_t ino, int fd)
{
    if (!cowfs_readahead_on())
        return;
    char first;
    struct iovec iov = {&first, 1};
    cowfs_lookup_read_ahead(ino, preadv2(fd, &iov, 1, 0, RWF_NOWAIT) < 0);
}

unsigned long cowfs_reads_answered(void)
{
    return __atomic_load_n(&answered, __ATOMIC_RELAXED);
}
