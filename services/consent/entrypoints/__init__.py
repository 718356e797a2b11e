"""Consent entrypoints: the HTTP API and the decision worker."""
