"""Tandem: model serving with stateless app servers and batching GPU workers."""

__version__ = "0.1.0"
