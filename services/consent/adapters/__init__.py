"""Consent adapters: read models of the topics consent answers from."""
