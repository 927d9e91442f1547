"""Layer 3: rows from their sources, packing into chunks, the held-out split, RLVR's prompts and the
Lightning data modules; imports layers 0-2."""
