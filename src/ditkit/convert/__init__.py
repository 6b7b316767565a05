"""Weight exchange with other DiT implementations."""
