"""gatewayd: an edge gateway daemon. Importing this package imports no driver library."""

__version__ = "0.1.0"
