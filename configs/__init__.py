"""ml-collections configs of fedblood runs (see launch.py); common.get_config() has every field."""
