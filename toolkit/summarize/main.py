"""Entry of ``repgeo summarize``: parameters from the command line, then the chosen scheduler runs the job."""

from __future__ import annotations

from ..errors import UserError
from .params import SummarizeParams, parse_observables
from .run import check_inputs, summarize


def run_summarize(args) -> int:
    if args.scheduler == "mpi":  # MPI first, so that the errors below are printed once (by rank 0), not per rank
        from ..extract.ranks import mpi_ranks

        ranks = mpi_ranks()
    if args.overlap_k < 1 or args.group_size < 3:
        raise UserError("--overlap-k must be at least 1 and --group-size at least 3")
    params = SummarizeParams(
        observables=parse_observables(args.observables, args.groupby, args.reference),
        overlap_k=args.overlap_k, save_knn=args.save_knn, groupby=args.groupby, reference=args.reference,
        group_size=args.group_size, seed=args.seed,
    )
    if args.scheduler == "mpi":
        from .cluster import run_on_mpi

        _, groups = check_inputs(args.store, args.out, params, args.resume)  # every rank refuses alike
        run_on_mpi(lambda client: summarize(args.store, args.out, params, client, groups), ranks)
        return 0
    _, groups = check_inputs(args.store, args.out, params, args.resume)
    if args.scheduler == "local":
        from .cluster import local_client

        with local_client(args.workers) as client:
            summarize(args.store, args.out, params, client, groups)
    else:
        from .cluster import address_client

        with address_client(args.scheduler) as client:
            summarize(args.store, args.out, params, client, groups)
    return 0
