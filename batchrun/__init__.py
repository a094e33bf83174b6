"""batchrun: bulk OpenAI requests from JSONL, spread over RQ workers that share one rate budget in Redis."""

__version__ = "0.1.0"
