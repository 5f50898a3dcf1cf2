"""Entries of ``repgeo sae train`` and ``repgeo sae cooccurrence``: settings from the command line, then the job."""

from __future__ import annotations

from ..runtime.cluster import run_with_client, start_mpi
from .cooccurrence import CooccurrenceSettings, check_inputs, run_cooccurrence
from .train import TrainSettings, train_sae


def run_train(args) -> int:
    train_sae(TrainSettings(store=args.store, layer=args.layer, out=args.out, features=args.features, k=args.k,
                            epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
                            device=args.device))
    return 0


def run_sae_cooccurrence(args) -> int:
    ranks = start_mpi(args.scheduler)
    settings = CooccurrenceSettings(store=args.store, sae=args.sae, layer=args.layer, out=args.out,
                                    threshold=args.threshold, block=args.block, clusters=args.clusters,
                                    seed=args.seed, permutations=args.permutations,
                                    galaxy_tokens=args.galaxy_tokens)
    checked = check_inputs(settings)  # under MPI every rank refuses alike
    run_with_client(args.scheduler, args.workers, lambda client: run_cooccurrence(settings, client, checked), ranks)
    return 0
