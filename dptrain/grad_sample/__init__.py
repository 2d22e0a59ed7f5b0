"""Per-sample gradient rules, one module type per file."""
