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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 32 /* the API level pyfuse3 3.5 is built against */
#include <dlfcn.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <string.h>

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

static session_new_fn real_session_new(void)
{
    static session_new_fn real;
    if (real == NULL) {
        void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
        if (libfuse != NULL)
            real = (session_new_fn)dlvsym(libfuse, "fuse_session_new", "FUSE_3.0");
    }
    return real;
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
    return se;
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped);
}

static PyMethodDef methods[] = {
    {"active", active, METH_NOARGS,
     "True when the live session's handlers receive inode numbers for zero handles."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cowfs._fuse_shim",
    "Interposes fuse_session_new() so that handlers learn the inode of zero handles.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
