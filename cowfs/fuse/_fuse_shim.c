/* Let the kernel cache listings and opens of the pyfuse3 daemon.
 *
 * Every round trip to the Python daemon costs ~80 us. Without help, each opendir() of a
 * mounted directory costs three (OPENDIR, READDIRPLUS, RELEASEDIR) and each open() of a file
 * two (OPEN, RELEASE), even when the kernel already caches the data: a `find` over
 * site-packages, reading it, or importing from it runs many times slower than on a disk.
 *
 * The kernel has a zero-round-trip mode for both: when OPEN (OPENDIR) answers ENOSYS it stops
 * sending OPEN/RELEASE (OPENDIR/RELEASEDIR) for the connection, keeps file pages cached across
 * opens and caches listings as if every opendir had answered FOPEN_KEEP_CACHE |
 * FOPEN_CACHE_DIR (changes made through the mount invalidate them; the daemon invalidates
 * what it changes itself). Requests then carry handle 0, and pyfuse3 3.5 hands its read,
 * write, fsync and readdir handlers only the handle, never the inode.
 *
 * This module fills that gap: loaded RTLD_GLOBAL before pyfuse3, it interposes
 * fuse_session_new() and wraps those handlers so that a zero handle reaches Python as
 * BY_INODE | inode (readdir: the inode). It also turns off atomic O_TRUNC, which assumes the
 * OPEN request that no longer comes: the kernel sends a SETATTR(size=0) instead. Python asks
 * active() whether the wrappers are in place (not when pyfuse3 was loaded first, or libfuse's
 * table is larger than the one compiled here) and only then answers ENOSYS.
 *
 * FUSE passthrough (kernel 6.9+) is the other way to serve reads without the daemon: OPEN is
 * answered with FOPEN_PASSTHROUGH and a backing id registered on /dev/fuse, and the kernel
 * then reads, writes and mmaps the backing file itself, sharing its page cache. libfuse 3.14
 * knows nothing of it, so (only when Python asks for it, want_passthrough()) this module adds
 * FUSE_PASSTHROUGH to the INIT reply libfuse builds (captured on a socket in place of the
 * /dev/fuse fd, patched, then written to the kernel), builds OPEN replies that carry a backing
 * id (PT_FLAG in the handle, see fuse_shim.py), and opens and closes backing ids.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 32 /* the API level pyfuse3 3.5 is built against */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "_fuse_reader.h"

#define BY_INODE (1ULL << 63) /* handles the daemon hands out are small integers */

typedef void (*io_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void (*write_fn)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t,
                         struct fuse_file_info *);
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                             struct fuse_file_info *);
typedef void (*fsync_fn)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);
typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t, void *);

/* The kernel ABI of passthrough (include/uapi/linux/fuse.h 7.40); libfuse 3.14's is 7.36. */
#define FUSE_INIT_OPCODE 26
#define FUSE_PASSTHROUGH_FLAGS2 (1U << 5) /* FUSE_PASSTHROUGH is 1ULL << 37 */
#define FUSE_WRITEBACK_CACHE_FLAG (1U << 16)
#define FUSE_INIT_EXT_FLAG (1U << 30)
#define FOPEN_DIRECT_IO_FLAG (1U << 0)
/* Backing files may sit on a filesystem of stack depth 0 (ext4, xfs, tmpfs...), not on an
 * overlay: that keeps this mount stackable under an overlay itself. */
#define MAX_STACK_DEPTH 1


/* A handle the daemon marks for a passthrough reply: PT_FLAG | [PT_DIRECT] | id << 32 | fh */
#define PT_FLAG (1ULL << 62)
#define PT_DIRECT (1ULL << 61)

struct init_out { /* fuse_init_out, 64 bytes since 7.23 */
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, max_stack_depth;
    uint32_t unused[6];
};

static struct fuse_session *session;
static int want_pt;  /* Python asked for passthrough */
static int pt_state; /* 0: not asked, 1: the kernel did not offer it, 2: put in INIT reply */

static struct fuse_lowlevel_ops wrapped_ops;
static struct fuse_lowlevel_ops pyfuse3_ops;
static int wrapped;

/* pyfuse3 copies the handle out of fi before its handler returns: a stack copy is enough. */
static struct fuse_file_info *by_inode(struct fuse_file_info *copy,
                                       const struct fuse_file_info *fi, fuse_ino_t ino)
{
    *copy = *fi;
    if (copy->fh == 0)
        copy->fh = BY_INODE | ino;
    return copy;
}

static void readdirplus_by_inode(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                                 struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh = ino;
    pyfuse3_ops.readdirplus(req, ino, size, off, &copy);
}

static void read_by_inode(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                          struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    pyfuse3_ops.read(req, ino, size, off, by_inode(&copy, fi, ino));
}

static void write_by_inode(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                           off_t off, struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    pyfuse3_ops.write(req, ino, buf, size, off, by_inode(&copy, fi, ino));
}

static void write_buf_by_inode(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv,
                               off_t off, struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    pyfuse3_ops.write_buf(req, ino, bufv, off, by_inode(&copy, fi, ino));
}

static void fsync_by_inode(fuse_req_t req, fuse_ino_t ino, int datasync,
                           struct fuse_file_info *fi)
{
    struct fuse_file_info copy;
    pyfuse3_ops.fsync(req, ino, datasync, by_inode(&copy, fi, ino));
}

static void init_without_atomic_trunc(void *userdata, struct fuse_conn_info *conn)
{
    pyfuse3_ops.init(userdata, conn);
    conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
}

static void *real_libfuse(const char *name)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    return libfuse == NULL ? NULL : dlvsym(libfuse, name, "FUSE_3.0");
}

static session_new_fn real_session_new(void)
{
    static session_new_fn real;
    if (real == NULL)
        real = (session_new_fn)real_libfuse("fuse_session_new");
    return real;
}

/* libfuse writes its INIT reply to the session fd: for that one request the fd number is a
 * socket (nothing else runs in this thread meanwhile), the reply is patched, then sent. */
static void init_with_passthrough(struct fuse_session *se, const struct fuse_buf *buf,
                                  void (*real)(struct fuse_session *, const struct fuse_buf *))
{
    int fd = cowfs_real_session_fd(se), sp[2], saved;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) != 0)
        goto plain;
    saved = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (saved < 0 || dup2(sp[0], fd) < 0) {
        if (saved >= 0)
            close(saved);
        close(sp[0]);
        close(sp[1]);
        goto plain;
    }
    real(se, buf);
    dup3(saved, fd, O_CLOEXEC); /* libfuse opened /dev/fuse O_CLOEXEC */
    close(saved);
    close(sp[0]);
    unsigned char reply[4096];
    ssize_t n = recv(sp[1], reply, sizeof reply, MSG_DONTWAIT);
    close(sp[1]);
    if (n <= 0)
        return; /* libfuse sent nothing: the kernel waits for nothing either */
    struct cowfs_out_header *oh = (struct cowfs_out_header *)reply;
    struct init_out *out = (struct init_out *)(reply + sizeof *oh);
    if (oh->error == 0 && (size_t)n >= sizeof *oh + sizeof *out &&
        (out->flags & FUSE_INIT_EXT_FLAG) && !(out->flags & FUSE_WRITEBACK_CACHE_FLAG)) {
        out->flags2 |= FUSE_PASSTHROUGH_FLAGS2;
        out->max_stack_depth = MAX_STACK_DEPTH;
        pt_state = 2;
    }
    if (write(fd, reply, (size_t)n) != n)
        perror("cowfs: INIT reply");
    return;
plain:
    real(se, buf);
}

void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    static void (*real)(struct fuse_session *, const struct fuse_buf *);
    if (real == NULL)
        real = (void (*)(struct fuse_session *, const struct fuse_buf *))real_libfuse(
            "fuse_session_process_buf");
    const size_t in_hdr = 40; /* fuse_in_header; fuse_init_in follows: flags2 at +16 */
    if (want_pt && pt_state == 0 && !(buf->flags & FUSE_BUF_IS_FD) &&
        buf->size >= in_hdr + 20 && ((const uint32_t *)buf->mem)[1] == FUSE_INIT_OPCODE) {
        const uint32_t *in = (const uint32_t *)((const char *)buf->mem + in_hdr);
        pt_state = 1;
        if ((in[3] & FUSE_INIT_EXT_FLAG) && (in[4] & FUSE_PASSTHROUGH_FLAGS2)) {
            init_with_passthrough(se, buf, real);
            return;
        }
    }
    real(se, buf);
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static int (*real)(fuse_req_t, const struct fuse_file_info *);
    if (real == NULL)
        real = (int (*)(fuse_req_t, const struct fuse_file_info *))real_libfuse(
            "fuse_reply_open");
    if (!(fi->fh & PT_FLAG) || fi->fh & BY_INODE)
        return real(req, fi);
    struct {
        uint64_t fh;
        uint32_t open_flags;
        int32_t backing_id; /* fuse_open_out's padding before 7.40 */
    } out = {fi->fh, FOPEN_PASSTHROUGH_FLAG | (fi->fh & PT_DIRECT ? FOPEN_DIRECT_IO_FLAG : 0),
             (int32_t)((fi->fh >> 32) & 0x1fffffff)};
    return fuse_reply_buf(req, (const char *)&out, sizeof out);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    session_new_fn real = real_session_new();
    if (real == NULL) {
        fprintf(stderr, "cowfs: libfuse3's fuse_session_new not found\n");
        return NULL;
    }
    wrapped = 0;
    if (op == NULL || op_size != sizeof wrapped_ops || !op->readdirplus || !op->read ||
        !op->write || !op->write_buf || !op->fsync || !op->init)
        return real(args, op, op_size, userdata);
    pyfuse3_ops = *op;
    wrapped_ops = *op;
    wrapped_ops.readdirplus = readdirplus_by_inode;
    wrapped_ops.read = read_by_inode;
    wrapped_ops.write = write_by_inode;
    wrapped_ops.write_buf = write_buf_by_inode;
    wrapped_ops.fsync = fsync_by_inode;
    wrapped_ops.init = init_without_atomic_trunc;
    struct fuse_session *se = real(args, &wrapped_ops, op_size, userdata);
    wrapped = se != NULL;
    session = se;
    pt_state = 0;
    return se;
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped);
}

static PyObject *want_passthrough(PyObject *self, PyObject *arg)
{
    (void)self;
    want_pt = PyObject_IsTrue(arg) == 1;
    Py_RETURN_NONE;
}

static PyObject *passthrough_state(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(pt_state);
}

static int session_fd(void)
{
    return session == NULL ? -1 : cowfs_real_session_fd(session);
}

static PyObject *backing_open(PyObject *self, PyObject *arg)
{
    (void)self;
    struct backing_map map = {(int32_t)PyLong_AsLong(arg), 0, 0};
    if (PyErr_Occurred())
        return NULL;
    int id = ioctl(session_fd(), BACKING_OPEN, &map);
    if (id < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(id);
}

static PyObject *backing_close(PyObject *self, PyObject *arg)
{
    (void)self;
    uint32_t id = (uint32_t)PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (ioctl(session_fd(), BACKING_CLOSE, &id) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *want_reader(PyObject *self, PyObject *arg)
{
    (void)self;
    cowfs_reader_want(PyObject_IsTrue(arg) == 1);
    Py_RETURN_NONE;
}

static PyObject *reader_state(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(ik)", cowfs_reader_running(), cowfs_reader_answered());
}

static PyObject *fast_publish(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int id;
    unsigned int pid;
    const char *attr;
    Py_ssize_t attr_len;
    if (!PyArg_ParseTuple(args, "KiIy#", &ino, &id, &pid, &attr, &attr_len))
        return NULL;
    if (attr_len != COWFS_ATTR_OUT_SIZE) {
        PyErr_SetString(PyExc_ValueError, "fuse_attr_out is 104 bytes");
        return NULL;
    }
    if (cowfs_fast_publish(ino, id, pid, (const unsigned char *)attr) != 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *fast_hold(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "KI", &ino, &pid))
        return NULL;
    int serving = 0;
    int32_t id = cowfs_fast_hold(ino, pid, &serving);
    return Py_BuildValue("(iO)", id, serving ? Py_True : Py_False);
}

static PyObject *fast_first_opens(PyObject *self, PyObject *arg)
{
    (void)self;
    cowfs_fast_first_opens(PyObject_IsTrue(arg) == 1);
    Py_RETURN_NONE;
}

static PyObject *read_ahead(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int fd;
    if (!PyArg_ParseTuple(args, "Ki", &ino, &fd))
        return NULL;
    cowfs_opened_read_ahead(ino, fd);
    Py_RETURN_NONE;
}

static PyObject *fast_block(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int on;
    if (!PyArg_ParseTuple(args, "Kp", &ino, &on))
        return NULL;
    cowfs_fast_block(ino, on);
    Py_RETURN_NONE;
}

static PyObject *fast_stop_all(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    cowfs_fast_stop_all(session_fd());
    Py_RETURN_NONE;
}

static PyObject *fast_stop(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int force;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "KpI", &ino, &force, &pid))
        return NULL;
    return PyLong_FromLongLong(cowfs_fast_stop(ino, force, pid));
}

static PyObject *fast_totals(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    unsigned long entries, opens, answered, attrs, firsts;
    cowfs_fast_totals(&entries, &opens, &answered, &attrs, &firsts);
    return Py_BuildValue("(kkkkk)", entries, opens, answered, attrs, firsts);
}

static PyObject *dir_publish(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long parent;
    PyObject *items;
    const char *negative = NULL;
    Py_ssize_t negative_len = 0;
    if (!PyArg_ParseTuple(args, "KO!|z#", &parent, &PyList_Type, &items, &negative,
                          &negative_len)) /* (z#: None, no negative answer) */
        return NULL;
    if (negative != NULL && negative_len != COWFS_ENTRY_OUT_SIZE) {
        PyErr_SetString(PyExc_ValueError, "fuse_entry_out is 128 bytes");
        return NULL;
    }
    Py_ssize_t added = 0, missing = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        const char *name, *entry, *source;
        Py_ssize_t name_len, entry_len, source_len;
        unsigned long long ino;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(items, i), "y#Ky#y#", &name, &name_len, &ino,
                              &entry, &entry_len, &source, &source_len))
            return NULL;
        if (entry_len != COWFS_ENTRY_OUT_SIZE) {
            PyErr_SetString(PyExc_ValueError, "fuse_entry_out is 128 bytes");
            return NULL;
        }
        int how = cowfs_dir_add(parent, name, (size_t)name_len, ino,
                                (const unsigned char *)entry, source, (size_t)source_len);
        added += how == 1;
        missing += how == 0;
    }
    /* Complete only if every name is there: a name left out would read as absent. */
    if (negative != NULL && missing == 0)
        cowfs_dir_complete(parent, (const unsigned char *)negative);
    return PyLong_FromSsize_t(added);
}

static PyObject *dir_listing(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long parent;
    const char *records;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Ky#", &parent, &records, &len))
        return NULL;
    int ok = cowfs_dir_listing(parent, (const unsigned char *)records, (size_t)len);
    if (ok < 0) {
        PyErr_SetString(PyExc_ValueError, "not a sequence of fuse_direntplus records");
        return NULL;
    }
    return PyBool_FromLong(ok);
}

static PyObject *dir_stop(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long parent = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    cowfs_dir_stop(parent);
    Py_RETURN_NONE;
}

static PyObject *dir_stop_all(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    cowfs_dir_stop_all();
    Py_RETURN_NONE;
}

static PyObject *lookups_of(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int take;
    if (!PyArg_ParseTuple(args, "Kp", &ino, &take))
        return NULL;
    return PyLong_FromUnsignedLongLong(cowfs_lookups_of(ino, take));
}

static PyObject *lookup_totals(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    unsigned long published, lookups, negatives, attrs, reads, listings, ahead, dropped;
    cowfs_lookup_totals(&published, &lookups, &negatives, &attrs, &reads, &listings);
    cowfs_readahead_totals(&ahead, &dropped);
    return Py_BuildValue("(kkkkkkkk)", published, lookups, negatives, attrs, reads, listings,
                         ahead, dropped);
}

static PyMethodDef methods[] = {
    {"active", active, METH_NOARGS,
     "True when the live session's handlers receive inode numbers for zero handles."},
    {"want_passthrough", want_passthrough, METH_O,
     "Ask for FUSE_PASSTHROUGH in the INIT reply of the next session."},
    {"passthrough_state", passthrough_state, METH_NOARGS,
     "0: not asked (yet), 1: the kernel did not offer passthrough, 2: put in the INIT reply."},
    {"backing_open", backing_open, METH_O, "Register an fd as a backing file: its id."},
    {"backing_close", backing_close, METH_O, "Drop a backing id."},
    {"want_reader", want_reader, METH_O,
     "Read /dev/fuse in a C thread that answers ioctls (see _fuse_reader.c)."},
    {"reader_state", reader_state, METH_NOARGS, "(running, ioctls answered by the reader)"},
    {"fast_publish", fast_publish, METH_VARARGS,
     "(ino, backing id, pid, fuse_attr_out): the reader answers read-only opens (one counted) "
     "and GETATTR of ino."},
    {"fast_hold", fast_hold, METH_VARARGS,
     "(ino, pid): count one more open: (its backing id or -1, whether the reader serves it)."},
    {"fast_first_opens", fast_first_opens, METH_O,
     "The reader registers the backing file of a published name's first open itself."},
    {"fast_stop_all", fast_stop_all, METH_NOARGS, "Stop every entry (idle ones: closed)."},
    {"read_ahead", read_ahead, METH_VARARGS,
     "(ino, fd): an open of ino on its store object fd: read ahead what a walk reads next."},
    {"fast_block", fast_block, METH_VARARGS,
     "(ino, on): the daemon has cached opens of ino: the reader makes no entry for it."},
    {"fast_stop", fast_stop, METH_VARARGS,
     "(ino, force, pid): its backing id when idle (removed), else -1 none, -2 busy, -3 draining."},
    {"fast_totals", fast_totals, METH_NOARGS, "(entries, counted opens, opens answered, GETATTRs answered, first opens registered)"},
    {"dir_publish", dir_publish, METH_VARARGS,
     "(parent, [(name, ino, fuse_entry_out, backing path or b'')][, negative fuse_entry_out]): "
     "the reader answers those LOOKUPs and GETATTRs (and first opens, see fast_first_opens); "
     "with a negative answer, those are all of parent's names and it answers other names "
     "with it."},
    {"dir_listing", dir_listing, METH_VARARGS,
     "(parent, fuse_direntplus records): the reader answers READDIRPLUS of parent."},
    {"dir_stop", dir_stop, METH_O, "Stop answering lookups in a directory."},
    {"dir_stop_all", dir_stop_all, METH_NOARGS, "Stop answering lookups anywhere."},
    {"lookups_of", lookups_of, METH_VARARGS,
     "(ino, take): lookups of ino the reader answered (taken: counted by the caller now)."},
    {"lookup_totals", lookup_totals, METH_NOARGS,
     "(published names, lookups answered, negative lookups answered, their GETATTRs answered, "
     "READs answered, READDIRPLUS answered, store objects read ahead, read-aheads dropped)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cowfs.fuse._fuse_shim",
    "Interposes fuse_session_new() so that handlers learn the inode of zero handles.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
