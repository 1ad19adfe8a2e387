"""What runs per message and per batch: a source delivers, the processor decodes, the batcher
collects, the writer commits and acks, dead letters take what can never be stored."""
