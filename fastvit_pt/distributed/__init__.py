"""Process groups and engines. Parallelism is applied here, from outside the models."""
