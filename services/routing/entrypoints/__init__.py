"""Routing entrypoints: the directory API and the routing worker (faust agent)."""
