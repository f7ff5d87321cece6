"""Pipeline stages: plain Python callables over batches (dicts of columns). No Ray in here."""
