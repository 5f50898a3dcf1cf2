"""What every job shares: MPI ranks, Dask clients, task settings, the partial-directory builder, option grammar."""
