"""Routing adapters: the provider directory on its compacted Kafka topic."""
