"""The runtime: the driver (trigger loop), progress, fault injection."""
