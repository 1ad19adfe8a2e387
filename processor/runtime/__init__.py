"""Process wiring every command shares: logs, metrics, the health endpoints, the allocator,
Pub/Sub clients, waiting for dependencies at start-up."""
