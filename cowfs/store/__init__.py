"""The shared store: content-addressed objects, distribution manifests, the layers built from
them, gc roots and leases, garbage collection, and remotes."""
