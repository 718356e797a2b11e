"""Routing use cases that sit between the entrypoints and the adapters."""
