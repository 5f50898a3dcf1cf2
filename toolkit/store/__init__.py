"""Storage layouts: the activation store and the results store (Zarr v3), their schemas, and their checks."""
