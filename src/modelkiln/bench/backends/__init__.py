"""Clients of the servers a benchmark drives (one module per API family)."""
