"""``repgeo extract``: prompts → activation store, over MPI ranks."""
