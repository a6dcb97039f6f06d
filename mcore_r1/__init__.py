"""mcore_r1."""
