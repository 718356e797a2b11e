"""The local platform: real Kafka, S3 (versitygw) and PostgreSQL started from the package registries."""
