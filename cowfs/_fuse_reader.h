/* The FUSE reader thread (_fuse_reader.c), as _fuse_shim.c uses it. */
#ifndef COWFS_FUSE_READER_H
#define COWFS_FUSE_READER_H

struct fuse_session;

/* libfuse's own fuse_session_fd(): the /dev/fuse fd (the interposed one may return the
 * reader's eventfd). */
int cowfs_real_session_fd(struct fuse_session *se);
/* Ask for the reader before pyfuse3 mounts (it starts when pyfuse3 asks for the fd). */
void cowfs_reader_want(int on);
int cowfs_reader_running(void);
unsigned long cowfs_reader_answered(void);

#endif
