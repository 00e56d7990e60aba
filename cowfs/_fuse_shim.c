/* Let the kernel cache directory listings of the pyfuse3 daemon.
 *
 * Without a cache, every opendir() of a mounted directory costs the Python daemon three round
 * trips (OPENDIR, READDIRPLUS, RELEASEDIR), ~80 us each: a `find` over site-packages or the
 * import system's directory scans run an order of magnitude slower than on a native disk.
 *
 * The kernel has a zero-round-trip mode: when OPENDIR answers ENOSYS it stops sending
 * OPENDIR/RELEASEDIR for the connection and caches listings as if every opendir had answered
 * FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR (invalidated by changes made through the mount, and by
 * notify_inval_inode for changes the daemon makes itself). Readdir then arrives with handle 0,
 * and pyfuse3 3.5 hands its readdir handler only the handle, never the inode.
 *
 * This module fills that gap and nothing else: loaded RTLD_GLOBAL before pyfuse3, it
 * interposes fuse_session_new() and wraps the readdirplus handler so that the handle pyfuse3
 * sees is the directory's inode number. Python asks readdir_by_inode() whether the wrapper is
 * in place (it is not when pyfuse3 was loaded first, or libfuse's table is larger than the
 * one compiled here) and only then answers OPENDIR with ENOSYS.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 32 /* the API level pyfuse3 3.5 is built against */
#include <dlfcn.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <string.h>

typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t, void *);

static struct fuse_lowlevel_ops wrapped_ops;
static readdir_fn pyfuse3_readdirplus;
static int wrapped;

static void readdirplus_by_inode(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                                 struct fuse_file_info *fi)
{
    struct fuse_file_info by_inode = *fi; /* pyfuse3 copies fh before it returns */
    by_inode.fh = ino;
    pyfuse3_readdirplus(req, ino, size, off, &by_inode);
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
    if (op == NULL || op_size > sizeof wrapped_ops || op->readdirplus == NULL)
        return real(args, op, op_size, userdata);
    memset(&wrapped_ops, 0, sizeof wrapped_ops);
    memcpy(&wrapped_ops, op, op_size);
    pyfuse3_readdirplus = op->readdirplus;
    wrapped_ops.readdirplus = readdirplus_by_inode;
    struct fuse_session *se = real(args, &wrapped_ops, op_size, userdata);
    wrapped = se != NULL;
    return se;
}

static PyObject *readdir_by_inode(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(wrapped);
}

static PyMethodDef methods[] = {
    {"readdir_by_inode", readdir_by_inode, METH_NOARGS,
     "True when the live session's readdir handler receives inode numbers as handles."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cowfs._fuse_shim",
    "Interposes fuse_session_new() so that readdir learns the directory's inode.", -1, methods,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
