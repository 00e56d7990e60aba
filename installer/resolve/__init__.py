"""From requirements to pinned wheels on disk: resolution (uv or pip), lock files and the
local fast path with its cache, where packages come from, downloads and their prefetch,
and installs from remotes."""
