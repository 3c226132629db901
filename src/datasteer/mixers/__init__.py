"""Domain mixers, one per file, registered by name (`datasteer components mixer` lists them)."""
