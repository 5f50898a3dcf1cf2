"""Entry of ``repgeo summarize``: parameters from the command line, then the chosen scheduler runs the job."""

from __future__ import annotations

from ..runtime.cluster import run_with_client, start_mpi
from .params import SummarizeParams, parse_observables
from .run import check_inputs, summarize


def run_summarize(args) -> int:
    ranks = start_mpi(args.scheduler)
    params = SummarizeParams(
        observables=parse_observables(args.observables, args.groupby, args.reference),
        overlap_k=args.overlap_k, save_knn=args.save_knn,
        distance_dtype=args.distance_dtype if args.save_distances else None, groupby=args.groupby, reference=args.reference,
        group_size=args.group_size, seed=args.seed, skip_tokens=args.skip_tokens, contrib_span=args.contrib_span,
    )
    groups = check_inputs(args.store, args.out, params, args.resume)  # under MPI every rank refuses alike
    run_with_client(args.scheduler, args.workers, lambda client: summarize(args.store, args.out, params, client,
                                                                            groups), ranks)
    return 0
