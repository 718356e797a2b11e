"""Ingest adapters: multipart/related streaming, the peer directory."""
