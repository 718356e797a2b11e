"""The five services, each its own process: ingest, consent, routing, notify, timeline."""
