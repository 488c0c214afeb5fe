"""The peers the benchmark compares with: Spark Structured Streaming and a Python framework."""
