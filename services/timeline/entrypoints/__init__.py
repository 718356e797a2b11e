"""How the timeline is driven: the projection worker, the HTTP API."""
