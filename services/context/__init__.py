"""The context service: exact token counts and budget-aware windowing (a separate process)."""
