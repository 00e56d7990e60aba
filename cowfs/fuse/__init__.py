"""The mount daemon: the pyfuse3 adapter over the overlay (ops), what it hands the kernel
(entries, kernel_replies), the C reader thread and its Python side (fuse_shim, fastlookup,
passthrough: cowfs/fuse/_fuse_*.c), and getting out of the way of a deleted venv."""
