"""gatewayctl: the on-site command line."""
