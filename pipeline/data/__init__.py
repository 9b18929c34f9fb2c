"""Data sets: reading a local file or a hub data set into rows, their digests, hub checks, and the starter config of `posttrain init`."""
