"""Hook implementations of the lru plugin (filled in by its issue)."""
