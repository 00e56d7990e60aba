"""Installing wheels (uv's install-wheel): reading and checking archives, putting their files
into the store with one manifest each, per-venv scripts, shared bytecode, matching another
installer's RECORD, and ingesting wheels while others still download."""
