"""Developer and test tooling (not deployed)."""
