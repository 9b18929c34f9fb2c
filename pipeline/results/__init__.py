"""Stage results on disk: manifests (what a stage made, with its files' digests) and the results
store shared between machines."""
