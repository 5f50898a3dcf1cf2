"""``repgeo summarize``: activation store → results store, with Dask on MPI ranks or a local cluster."""
