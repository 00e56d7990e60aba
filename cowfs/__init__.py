"""cowfs: a copy-on-write FUSE overlay for shared Python package stores."""

__version__ = "0.1.0"
