"""Helpers shared by the test modules (fixtures are re-exported by the modules that use them)."""
