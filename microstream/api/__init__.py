"""The user-facing API: StreamFrame and its group-by objects, the scan_* facades, sinks, StreamingQuery, the session (registry of queries and tables), replay."""
