"""Overlay semantics, independent of FUSE: the merged view (overlay), name lookups and
mutations (namespace), inodes, the lower and upper layers, copy-up, metadata the upper
filesystem cannot hold, reset, and building an overlay from a mount spec (super)."""
