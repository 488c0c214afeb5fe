"""The ``microstream`` command."""
