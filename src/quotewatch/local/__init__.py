"""Real infrastructure for machines without Docker: a local Apache Kafka (KRaft), an MLflow server, the stack."""
