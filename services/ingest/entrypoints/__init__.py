"""Ingest entrypoints: STOW-RS routes, the C-STORE SCP, the study assembly agent."""
