"""Stateful operators, one module each: node and runtime side by side."""
