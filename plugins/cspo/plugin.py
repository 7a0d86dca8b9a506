"""Hook implementations of the cspo plugin (filled in by its issue)."""
