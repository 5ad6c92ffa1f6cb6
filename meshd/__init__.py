"""meshd: a decentralized learning daemon for data-mesh domains."""

__version__ = "0.1.0"
