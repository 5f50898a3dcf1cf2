"""Entries of ``repgeo sae train`` and ``repgeo sae cooccurrence``: settings from the command line, then the job."""

from __future__ import annotations

from .cooccurrence import CooccurrenceSettings, check_inputs, run_cooccurrence
from .train import TrainSettings, train_sae


def run_train(args) -> int:
    train_sae(TrainSettings(store=args.store, layer=args.layer, out=args.out, features=args.features, k=args.k,
                            epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
                            device=args.device))
    return 0


def run_sae_cooccurrence(args) -> int:
    if args.scheduler == "mpi":  # MPI first, so that the errors below are printed once (by rank 0), not per rank
        from ..extract.ranks import mpi_ranks

        ranks = mpi_ranks()
    settings = CooccurrenceSettings(store=args.store, sae=args.sae, layer=args.layer, out=args.out,
                                    threshold=args.threshold, block=args.block, clusters=args.clusters,
                                    seed=args.seed, permutations=args.permutations,
                                    galaxy_tokens=args.galaxy_tokens)
    checked = check_inputs(settings)  # under MPI every rank refuses alike
    if args.scheduler == "mpi":
        from ..summarize.cluster import run_on_mpi

        run_on_mpi(lambda client: run_cooccurrence(settings, client, checked), ranks)
    elif args.scheduler == "local":
        from ..summarize.cluster import local_client

        with local_client(args.workers) as client:
            run_cooccurrence(settings, client, checked)
    else:
        from ..summarize.cluster import address_client

        with address_client(args.scheduler) as client:
            run_cooccurrence(settings, client, checked)
    return 0
