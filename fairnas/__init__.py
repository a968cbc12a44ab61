"""fairnas: weight-sharing neural architecture search the FairNAS way, end to end."""

__version__ = "0.1.0"
