"""Sample selectors, one per file, registered by name (`datasteer components selector` lists them)."""
