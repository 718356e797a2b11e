"""The local platform: real Kafka, S3 (versitygw) and PostgreSQL from package registries."""
