"""Limits on what goes to an upstream: the fleet's shared budget (the only redis importer)."""
