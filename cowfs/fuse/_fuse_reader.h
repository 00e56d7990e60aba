/* The FUSE reader thread (_fuse_reader.c), as _fuse_shim.c uses it. */
#ifndef COWFS_FUSE_READER_H
#define COWFS_FUSE_READER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

struct fuse_session;

/* libfuse's own fuse_session_fd(): the /dev/fuse fd (the interposed one may return the
 * reader's eventfd). */
int cowfs_real_session_fd(struct fuse_session *se);
/* Ask for the reader before pyfuse3 mounts (it starts when pyfuse3 asks for the fd). */
void cowfs_reader_want(int on);
int cowfs_reader_running(void);
unsigned long cowfs_reader_answered(void);

/* The kernel's request and reply headers (fuse_in_header, fuse_out_header). */
struct cowfs_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct cowfs_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

/* Passthrough (include/uapi/linux/fuse.h 7.40; libfuse 3.14 knows 7.36). */
#define FOPEN_PASSTHROUGH_FLAG (1U << 7)
struct backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define BACKING_OPEN _IOW(229, 1, struct backing_map)
#define BACKING_CLOSE _IOW(229, 2, uint32_t)

/* Passthrough opens of published store objects (_fuse_fastopen.c). */
#define COWFS_FAST_NONE (-1)     /* cowfs_fast_stop: no entry */
#define COWFS_FAST_BUSY (-2)     /* ... opens use it: not stopped */
#define COWFS_FAST_DRAINING (-3) /* ... stopped; its last release closes the backing id */
/* 1 when the reader answered the request (OPEN, RELEASE, GETATTR of a published node). */
int cowfs_fast_answer(int dev_fd, const void *mem, size_t n);
#define COWFS_ATTR_OUT_SIZE 104 /* fuse_attr_out */
int cowfs_fast_publish(uint64_t nodeid, int32_t backing_id, uint32_t pid,
                       const unsigned char attr_out[COWFS_ATTR_OUT_SIZE]);
int32_t cowfs_fast_hold(uint64_t nodeid, uint32_t pid, int *serving);
/* From now on the reader registers the backing file of a published name's first open. */
void cowfs_fast_first_opens(int on);
/* While the daemon has cached opens of nodeid, the reader makes no entry for it. */
void cowfs_fast_block(uint64_t nodeid, int on);
void cowfs_fast_stop_all(int dev_fd);
int64_t cowfs_fast_stop(uint64_t nodeid, int force, uint32_t pid);
void cowfs_fast_totals(unsigned long *n_entries, unsigned long *n_opens,
                       unsigned long *answered, unsigned long *attrs, unsigned long *firsts);

/* LOOKUP and GETATTR in published lower-only directories (_fuse_fastlookup.c). */
#define COWFS_ENTRY_OUT_SIZE 128 /* fuse_entry_out */
int cowfs_lookup_answer(int dev_fd, const void *mem, size_t n);
int cowfs_lookup_getattr(int dev_fd, const struct cowfs_in_header *in);
/* 1 added, 2 already there (the same node), 0 not added (out of memory, another node). */
int cowfs_dir_add(uint64_t parent, const char *name, size_t len, uint64_t ino,
                  const unsigned char entry_out[COWFS_ENTRY_OUT_SIZE], const char *source,
                  size_t source_len);
/* Every name of parent is published: the reader answers LOOKUPs of others with this. */
int cowfs_dir_complete(uint64_t parent,
                       const unsigned char negative_entry_out[COWFS_ENTRY_OUT_SIZE]);
struct cowfs_read_in { /* fuse_read_in (READ, READDIRPLUS) */
    uint64_t fh, offset;
    uint32_t size, read_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};
/* READs of kernel opens of published files (_fuse_fastread.c); how many were answered. */
unsigned long cowfs_reads_answered(void);
/* A first READ, or first open in C (passthrough), of ino: read ahead what comes next
 * (cold: its backing file was not in the page cache). */
void cowfs_lookup_read_ahead(uint64_t ino, int cold);
/* The same at an open of ino whose backing file is fd: cold if its first page is. */
void cowfs_opened_read_ahead(uint64_t ino, int fd);
/* 1 when ino has a published name with a backing file path (copied into path, its GETATTR
 * answer into attr_out). */
int cowfs_lookup_source(uint64_t ino, char *path, size_t size,
                        unsigned char attr_out[COWFS_ATTR_OUT_SIZE]);
/* The READDIRPLUS records of a published directory: 1 set, 0 out of memory, -1 malformed. */
int cowfs_dir_listing(uint64_t parent, const unsigned char *records, size_t len);
/* 1 when the reader answered READDIRPLUS of a kernel-opened published directory. */
int cowfs_dir_read(int dev_fd, const void *mem, size_t n);
void cowfs_dir_stop(uint64_t parent);
void cowfs_dir_stop_all(void);
uint64_t cowfs_lookups_of(uint64_t ino, int take);
/* 1 when the reader answered a READ of a kernel open of a published file. */
int cowfs_lookup_read(int dev_fd, const void *mem, size_t n);
void cowfs_lookup_totals(unsigned long *published, unsigned long *lookups,
                         unsigned long *negatives, unsigned long *attrs, unsigned long *reads,
                         unsigned long *listings);

/* Read-ahead of store objects into the page cache (_fuse_prefetch.c): a hint only. */
int cowfs_readahead_on(void);
void cowfs_readahead(const char *path, size_t len, uint64_t size);
void cowfs_readahead_totals(unsigned long *done, unsigned long *dropped);

#endif
