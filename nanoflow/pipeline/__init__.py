"""The NanoFlow core: a layer's ops cut into nano-batches, placed on SM-partitioned execution units."""
