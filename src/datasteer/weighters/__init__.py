"""Per-sample loss weighters, one per file, registered by name (`datasteer components weighter`)."""
