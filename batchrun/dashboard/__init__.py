"""The live web dashboard and the Prometheus metrics (`batchrun dashboard`, `worker --metrics-port`):
read from Redis only, what the workers write anyway."""
