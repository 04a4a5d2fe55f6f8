"""The streaming application: Kafka in, Redis checkpoints, Kafka out."""
