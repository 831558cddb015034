"""The study a config describes: validation, the experiment, its stages and sweeps."""
