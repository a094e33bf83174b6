"""OpenAI's Batch API as a way to send (--via batch-api): a batch's jobs go out as remote batches
(/v1/files, /v1/batches), driven by an RQ job any batchrun worker runs (runner.py), and come back
through the same store as live results. See README "The Batch API"."""
