"""Documents, readers/writers, pipeline steps and executors, shards, loaders and mixtures."""
