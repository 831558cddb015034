"""fedblood: federated learning of white-blood-cell classifiers across clinical centers."""

__version__ = '0.1.0'
