"""Keyed state: the store, its rows and schema, reading it from outside."""
