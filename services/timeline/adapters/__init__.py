"""Timeline adapters: the PostgreSQL read model and the NEN 7513 audit trail."""
