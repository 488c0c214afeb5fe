"""The checkpoint: atomic storage, the write-ahead log records, the lock."""
