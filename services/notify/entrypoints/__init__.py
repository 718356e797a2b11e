"""How notify is driven: the delivery worker, the HTTP API."""
