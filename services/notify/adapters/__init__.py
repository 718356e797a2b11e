"""Notify adapters: the receivers' STOW-RS and C-STORE services, and webhooks."""
