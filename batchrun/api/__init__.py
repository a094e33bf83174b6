"""batchrun as a library: ``batchrun.run(requests)`` and the run every `batchrun run` is."""
