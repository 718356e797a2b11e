"""Abstract contract suites, one per port, subclassed per adapter."""
