"""Ingest use cases: store one received instance (validate, S3, announce)."""
