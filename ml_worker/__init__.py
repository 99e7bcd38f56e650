"""The GPU tier: ZeroMQ server, batcher, model runners, registry watcher."""
