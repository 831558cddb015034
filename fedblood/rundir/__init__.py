"""A run's directory: layout, config.json, checkpoints, logs and the run lock."""
