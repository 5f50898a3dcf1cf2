"""Command-line entry point: ``repgeo extract | summarize | plot | sae | validate | info``. Parsing and exit codes only."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .errors import UserError, unexpected

DTYPES = ("float16", "bfloat16", "float32")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit code 2) instead of the usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def _at_least(low: int):
    """An argparse type: a whole number ≥ ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    parse.__name__ = f"integer ≥ {low}"  # how argparse names the type in its message
    return parse


def _finite(low: float, strict: bool):
    """An argparse type: a finite number > ``low`` (strict) or ≥ ``low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '≥'} {low:g} (got {text})")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _scheduler(text: str) -> str:
    """local, mpi, or a Dask scheduler address (tcp://host:port or host:port)."""
    if text in ("local", "mpi"):
        return text
    rest = text.split("://", 1)[1] if "://" in text else text
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not local, mpi, or a scheduler address like "
                                         f"tcp://host:8786")
    return text


def _flow_targets(text: str):
    """last, all, or comma-separated token positions (≥ 0)."""
    if text in ("last", "all"):
        return text
    positions = _int_list(text)
    if not positions:
        raise argparse.ArgumentTypeError("give last, all, or positions such as 0,5,9")
    return tuple(sorted(set(positions)))


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("values must be 0 or more")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repgeo", description="Geometry of LLM hidden states: extract, summarize, share.")
    # Every command takes --debug: the traceback of an unexpected error instead of its one-line summary.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser("extract", parents=[common],
                        help="hidden states of every layer for a set of prompts → activation store")
    ex.add_argument("--model", required=True,
                    help="local Hugging Face directory, .gguf file, cached hub id, or alias smollm2-135m")
    ex.add_argument("--prompts", required=True, help="JSONL file (\"text\" + label fields), .txt file, or a "
                                                     "directory/glob of .txt files")
    ex.add_argument("--out", required=True, help="the activation store to create (a directory)")
    ex.add_argument("--max-tokens", type=POSITIVE, help="truncate prompts to N tokens")
    ex.add_argument("--min-tokens", type=POSITIVE, help="drop prompts shorter than N tokens")
    ex.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype (default float16)")
    ex.add_argument("--compute-dtype", choices=("auto",) + DTYPES, default="auto",
                    help="dtype of the forward pass (auto: float32 on CPU, bfloat16 on GPU unless --dtype float32)")
    ex.add_argument("--batch-size", type=POSITIVE, default=4, help="prompts per forward pass (default 4)")
    ex.add_argument("--shuffle-levels", type=_int_list, default=(),
                    help="e.g. 0,1,2: store each prompt with its tokens cut into 4^s blocks in a seeded order")
    ex.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the block shuffles (default 0)")
    ex.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                    help="first token: auto = what the tokenizer adds by default (nothing for SmolLM2, <bos> for "
                         "Gemma 3); always = --bos-token first, instead of the tokenizer's own special tokens; "
                         "never = no special tokens at all")
    ex.add_argument("--bos-token", help="the token prepended with --bos always (default: the tokenizer's bos_token; "
                                        "for SmolLM2 <|endoftext|>, not its chat marker <|im_start|>)")
    ex.add_argument("--contributions", action="store_true",
                    help="also store what each head, attention and MLP writes into the residual stream, and the "
                         "information flow to target tokens (Llama family and Gemma 3)")
    ex.add_argument("--flow-targets", type=_flow_targets, help="with --contributions: last (default: the last real "
                                                               "token), all, or positions such as 0,5,9")
    ex.add_argument("--flow-weighting", choices=("mean", "norm"),
                    help="with --contributions: heads' attention averaged (mean, default) or weighted by each "
                         "head's write norm (norm)")
    ex.add_argument("--flow-gradients", action="store_true",
                    help="with --contributions: also grad_norm, one backward pass per target")
    ex.add_argument("--yes", action="store_true", help="accept a very large request (--flow-targets all with "
                                                       "--flow-gradients on prompts over 256 tokens)")
    ex.add_argument("--resume", action="store_true", help="complete an existing store (or start one)")
    ex.add_argument("--withhold-texts", action="store_true", help="store each prompt's sha256, not its text")
    ex.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU of this rank's node-local index when CUDA is present, else CPU")
    ex.add_argument("--device-map", choices=("auto", "balanced", "sequential"),
                    help="for models too large for one GPU: run one rank per node and spread the model over "
                         "the node's GPUs (accelerate's device_map)")

    su = sub.add_parser("summarize", parents=[common],
                        help="observables of every (prompt, layer) cloud and of label groups → results store")
    su.add_argument("--store", required=True, help="the activation store (from repgeo extract)")
    su.add_argument("--out", required=True, help="the results store to create (a directory)")
    su.add_argument("--observables", help="comma-separated subset of: gride, twonn, overlap, cosine, anisotropy, bpc, "
                                          "reciprocity, norm, contributions, group_gride, group_anisotropy, group_kl "
                                          "(default: the per-prompt ones but contributions, plus the group ones with "
                                          "--groupby)")
    su.add_argument("--scheduler", default="local", type=_scheduler,
                    help="local (a Dask cluster on this node), mpi (Dask on the ranks of mpiexec/srun), or the "
                         "address of a running scheduler")
    su.add_argument("--workers", type=POSITIVE, help="workers of the local cluster (default: one per core)")
    su.add_argument("--groupby", help="a prompt label: pooled observables per group of prompts")
    su.add_argument("--reference", help="the group value that group_kl compares every group with")
    su.add_argument("--group-size", type=_at_least(3), default=2000, help="tokens pooled per group (default 2000)")
    su.add_argument("--overlap-k", type=POSITIVE, default=32, help="neighbourhood overlap for k = 1..K (default 32)")
    su.add_argument("--save-knn", action="store_true", help="keep every cloud's K nearest neighbours")
    su.add_argument("--save-distances", action="store_true",
                    help="keep every cloud's (token, token) Euclidean distance matrix, one chunk per (prompt, layer)")
    su.add_argument("--distance-dtype", choices=("float16", "float32"), default="float32",
                    help="storage dtype of --save-distances (default float32)")
    su.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the group subsampling (default 0)")
    su.add_argument("--contrib-span", type=POSITIVE, default=10,
                    help="contributions: correlations over the first and the last N tokens (default 10)")
    su.add_argument("--skip-tokens", type=NON_NEGATIVE, default=0,
                    help="leave the first N positions of every prompt out of every cloud and pool (default 0); "
                         "e.g. 1 without a BOS token, whose first position carries the model's massive activation")
    su.add_argument("--resume", action="store_true", help="complete an existing results store")

    le = sub.add_parser("lens", parents=[common],
                        help="read every layer's hidden states through the output (logit lens) and input embeddings "
                             "→ lens results store")
    le.add_argument("--store", required=True, help="the activation store (from repgeo extract)")
    le.add_argument("--out", required=True, help="the lens results store to create (a directory)")
    le.add_argument("--decoders", default="output,input", help="output (logit lens), input (cosine with the input "
                                                               "embedding), or both (default output,input)")
    le.add_argument("--top-k", type=POSITIVE, default=5, help="readings kept per token (default 5)")
    le.add_argument("--layers", help="layers to read: numbers and A:B ranges (B excluded), e.g. 1: or 0,5,10:20 "
                                     "(default: all)")
    le.add_argument("--model", help="the model's files when they moved since extraction (checked by sha256)")
    le.add_argument("--scheduler", default="local", type=_scheduler,
                    help="local, mpi (Dask on the ranks of mpiexec/srun), or the address of a running scheduler")
    le.add_argument("--workers", type=POSITIVE, help="workers of the local cluster (default: one per core)")
    le.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where workers compute (auto: a visible GPU, else the CPU)")
    le.add_argument("--resume", action="store_true", help="complete an existing lens store")

    rel = sub.add_parser("relations", help="geometry of relations between concepts: analogies, crystals, the "
                                           "first-order Markov check").add_subparsers(dest="relations_command",
                                                                                      required=True,
                                                                                      parser_class=_Parser)
    an = rel.add_parser("analogies", parents=[common],
                        help="averaged-delta and 3CosAdd analogies and concept crystals (LDA) in the input, output "
                             "and hidden spaces → relations results store")
    an.add_argument("--model", required=True, help="as for extract: a local directory, .gguf file or an alias")
    an.add_argument("--pairs", default=None, help="JSONL of {relation, subject, object} (default: the bundled "
                                                  "toolkit/data/relations.jsonl)")
    an.add_argument("--out", required=True, help="the relations results store to create (a directory)")
    an.add_argument("--spaces", default="input,output,hidden", help="input, output, hidden (default all three)")
    an.add_argument("--layers", help="hidden layers: numbers and A:B ranges (B excluded; default: all)")
    an.add_argument("--template", default="The word is {word}",
                    help="text around each word for the hidden space; {word} marks it and may not come first "
                         "(default 'The word is {word}')")
    an.add_argument("--top-k", type=POSITIVE, default=10, help="accuracy at 1 and at this k (default 10)")
    an.add_argument("--lda-components", type=POSITIVE, default=2, help="LDA components of the crystals (default 2)")
    an.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the out-of-sample split (default 0)")
    an.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present")
    mk = rel.add_parser("markov", parents=[common],
                        help="does the direct path (input embedding → unembedding) predict the bigram successor?")
    mk.add_argument("--model", required=True, help="as for extract: a local directory, .gguf file or an alias")
    mk.add_argument("--corpus", required=True, help="a UTF-8 text file, or an activation store (its input_ids)")
    mk.add_argument("--out", required=True, help="the Markov results store to create (a directory)")
    mk.add_argument("--top", type=POSITIVE, default=1000, help="the N most frequent tokens checked (default 1000)")
    mk.add_argument("--min-count", type=POSITIVE, default=20,
                    help="times a token must be followed by another for KL(bigram ‖ model) (default 20)")
    mk.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present")

    pl = sub.add_parser("plot", parents=[common],
                        help="PNG figures of every observable against layer and relative depth")
    pl.add_argument("results", help="a store: results (summarize), lens results (lens), relations, or an activation "
                                    "store with contributions (extract --contributions)")
    pl.add_argument("--out", required=True, help="directory for the figures")
    pl.add_argument("--groupby", help="results: a prompt label, one line per value (default: the store's --groupby)")
    pl.add_argument("--n2", type=_at_least(2), help="results: GRIDE scale to plot (default 32)")
    pl.add_argument("--k", type=POSITIVE, help="results: overlap neighbourhood size to plot (default 8)")
    pl.add_argument("--prompt", type=NON_NEGATIVE, help="lens: the prompt (index) whose layer × token grid to draw; "
                                                        "contributions: the prompt whose flow to draw")
    pl.add_argument("--target", type=NON_NEGATIVE, help="contributions: the target token position (default: the "
                                                        "store's first flow target of the prompt)")
    pl.add_argument("--min-weight", type=_finite(0, strict=False),
                    help="contributions: links lighter than this importance are not drawn (default 0.01)")
    pl.add_argument("--model", help="contributions: the model's files when they moved since extraction (checked by "
                                    "sha256)")
    pl.add_argument("--tokens", help="lens: the token positions A:B of the grid (B excluded; default: the first 40)")
    pl.add_argument("--layers", help="layers to draw: numbers and A:B ranges (B excluded), e.g. 1: or 0,5,10:20 "
                                     "(default: all)")

    sae = sub.add_parser("sae", help="sparse autoencoders on an activation store: train one, count feature "
                                     "co-occurrence").add_subparsers(dest="sae_command", required=True,
                                                                     parser_class=_Parser)
    tr = sae.add_parser("train", parents=[common], help="train a TopK SAE on one layer of a store (SAELens layout)")
    tr.add_argument("--store", required=True, help="the activation store (from repgeo extract)")
    tr.add_argument("--layer", required=True, type=int, help="layer of the store (0 = embeddings)")
    tr.add_argument("--out", required=True, help="the SAE directory to create (cfg.json + sae_weights.safetensors)")
    tr.add_argument("--features", type=POSITIVE, help="number of features (default 8 x d_model)")
    tr.add_argument("--k", type=POSITIVE, default=32, help="active features per token (default 32)")
    tr.add_argument("--epochs", type=POSITIVE, default=4, help="passes over the store's tokens (default 4)")
    tr.add_argument("--batch-tokens", type=POSITIVE, default=1024, help="tokens per optimiser step (default 1024)")
    tr.add_argument("--lr", type=_finite(0, strict=True), default=3e-3, help="Adam learning rate (default 3e-3)")
    tr.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of initialisation and shuffling (default 0)")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present")

    co = sae.add_parser("cooccurrence", parents=[common],
                        help="feature co-occurrence in token blocks → affinities, spectra, lobes, "
                                             "galaxy spectra (results store)")
    co.add_argument("--store", required=True, help="the activation store (from repgeo extract)")
    co.add_argument("--sae", required=True, help="SAE directory in the SAELens layout")
    co.add_argument("--layer", required=True, type=int, help="layer of the store the SAE reads (0 = embeddings)")
    co.add_argument("--out", required=True, help="the results store to create (a directory)")
    co.add_argument("--threshold", type=_finite(0, strict=False), default=1.0, help="a feature fires above this activation (default 1.0)")
    co.add_argument("--block", type=POSITIVE, default=256, help="tokens per block (default 256)")
    co.add_argument("--clusters", type=_int_list, default=(2, 4, 8), help="lobe counts (default 2,4,8)")
    co.add_argument("--scheduler", default="local", type=_scheduler, help="local, mpi (Dask on the ranks of mpiexec/srun), or the "
                                                         "address of a running scheduler")
    co.add_argument("--workers", type=POSITIVE, help="workers of the local cluster (default: one per core)")
    co.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of clustering, permutations, isotropic reference")
    co.add_argument("--permutations", type=_at_least(2), default=100, help="label permutations of the AMI baseline")
    co.add_argument("--galaxy-tokens", type=_at_least(2), default=2048,
                    help="tokens whose feature activations form the activation galaxy cloud (default 2048)")

    ss = sub.add_parser("subset", parents=[common],
                        help="a new, smaller store (activations or results): chosen prompts, layers and storage dtype")
    ss.add_argument("store", help="the source store (a path or a URL)")
    ss.add_argument("--out", required=True, help="the new store to create (a directory)")
    ss.add_argument("--where", help="a label expression, e.g. 'language == \"srp\" and year >= 1990' (comparisons of "
                                    "labels with literals joined by and/or/not)")
    ss.add_argument("--prompts", help="prompt indices: numbers and A:B ranges (B excluded), e.g. 0:100,250")
    ss.add_argument("--layers", help="layers to keep: numbers and A:B ranges (B excluded), e.g. 1: or 0,5,10:20")
    ss.add_argument("--dtype", choices=("float16", "bfloat16"),
                    help="store the hidden states in a narrower dtype (never wider than the source's)")
    ss.add_argument("--withhold-texts", action="store_true", help="keep each prompt's sha256, not its text")
    mg = sub.add_parser("merge", parents=[common],
                        help="one store of the prompts of several stores made with the same model and settings")
    mg.add_argument("stores", nargs="+", help="the stores to merge, in the order their prompts are to appear")
    mg.add_argument("--out", required=True, help="the merged store to create (a directory)")

    rp = sub.add_parser("reproduce", parents=[common],
                        help="run a study's whole experiment (resumable) and report which of its findings hold")
    rp.add_argument("study", choices=("token-geometry", "languages", "concepts", "models"),
                    help="token-geometry, languages, concepts or models")
    rp.add_argument("--out", help="the study's directory: stores, figures/, findings.json, report.md (default: "
                                  "reproduce-STUDY); rerunning the same command continues it")
    rp.add_argument("--model", help="model (alias, .gguf file or directory; default smollm2-135m); the models study "
                                    "takes a comma-separated list (default smollm2-135m,gemma3-270m)")
    rp.add_argument("--corpus", help="your prompt file (as extract --prompts) instead of the bundled corpus; it must "
                                     "carry the labels the study needs")
    rp.add_argument("--scale", choices=("tiny", "small", "full"), default="small",
                    help="how much of the corpus: tiny (a smoke test), small (minutes on a laptop, default), full")
    rp.add_argument("--min-tokens", type=_at_least(16),
                    help="token-geometry, models and concepts: tokens per prompt (shorter prompts are dropped, "
                         "longer cut; default: the study's at that --scale)")
    rp.add_argument("--scheduler", default="local", type=_scheduler,
                    help="local, mpi (under mpiexec/srun: every rank extracts, then Dask on the ranks), or the "
                         "address of a running scheduler")
    rp.add_argument("--workers", type=POSITIVE, help="workers of the local cluster (default: one per core)")
    rp.add_argument("--phase", choices=("all", "extract", "analyze"), default="all",
                    help="all (default); extract: only the extraction stages (a GPU job); analyze: the rest")

    va = sub.add_parser("validate", parents=[common], help="check a store against its schema")
    va.add_argument("path")
    va.add_argument("--deep", action="store_true", help="also read every chunk (checksums, NaN padding)")

    info = sub.add_parser("info", parents=[common],
                          help="model, prompts, labels, layers, size and completeness of a store")
    info.add_argument("path")
    return parser


def _extract(args) -> int:
    from .extract.run import ExtractSettings, run_extract

    settings = ExtractSettings(
        model=args.model, prompts=args.prompts, out=args.out, dtype=args.dtype, compute_dtype=args.compute_dtype,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, batch_size=args.batch_size,
        shuffle_levels=args.shuffle_levels, seed=args.seed, resume=args.resume,
        withhold_texts=args.withhold_texts, device=args.device, device_map=args.device_map, bos=args.bos,
        bos_token=args.bos_token, contributions=args.contributions, flow_targets=args.flow_targets,
        flow_weighting=args.flow_weighting, flow_gradients=args.flow_gradients, yes=args.yes,
    )
    return run_extract(settings)


def _summarize(args) -> int:
    from .summarize.main import run_summarize

    return run_summarize(args)


def _lens(args) -> int:
    from .lens.run import run_lens

    return run_lens(args)


def _relations(args) -> int:
    from .relations.main import run_analogies, run_markov

    return run_analogies(args) if args.relations_command == "analogies" else run_markov(args)


def _plot(args) -> int:
    from .plot import plot_store

    options = {name: getattr(args, name) for name in ("groupby", "n2", "k", "layers", "prompt", "tokens", "target",
                                                      "min_weight", "model")}
    for path in plot_store(args.results, args.out, **{k: v for k, v in options.items() if v is not None}):
        print(path)
    return 0


def _subset(args) -> int:
    from .share.subset import run_subset

    return run_subset(args)


def _merge(args) -> int:
    from .share.merge import run_merge

    return run_merge(args)


def _reproduce(args) -> int:
    from .reproduce.main import run_reproduce

    return run_reproduce(args)


def _validate(args) -> int:
    from .store.validate import validate_store

    problems = validate_store(args.path, deep=args.deep)
    for problem in problems:
        print(f"{args.path}: {problem}")
    if problems:
        return 1
    print(f"{args.path}: valid")
    return 0


def _info(args) -> int:
    from .store.info import store_info

    print(store_info(args.path))
    return 0


def _sae(args) -> int:
    from .sae.main import run_sae_cooccurrence, run_train

    return run_train(args) if args.sae_command == "train" else run_sae_cooccurrence(args)


COMMANDS = {"extract": _extract, "summarize": _summarize, "lens": _lens, "relations": _relations, "plot": _plot,
            "sae": _sae, "reproduce": _reproduce, "subset": _subset, "merge": _merge, "validate": _validate,
            "info": _info}


def main(argv=None) -> int:
    # Idle OpenMP threads must not spin on cores that the background writer or other ranks need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Libraries' own bars (one per rank, e.g. GGUF de-quantisation) would flood job logs; rank 0 reports progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "sae_command", None),
                                     getattr(args, "relations_command", None))))
    try:
        if "://" in str(getattr(args, "out", "")):  # before any work: a job's output is never written to a URL
            raise UserError(f"--out {args.out} is a URL: stores are read through URLs, never written; give a local "
                            f"path")
        return COMMANDS[args.command](args)
    except UserError as e:
        if _is_mpi_root():
            print(f"repgeo {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"repgeo {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an error no check foresaw: one line that says where, the traceback on request
        if args.debug:
            raise
        print(f"repgeo {command}: error: {unexpected(e)}", file=sys.stderr)
        return 2



def _is_mpi_root() -> bool:
    """Errors that every rank raises alike are printed once, by rank 0."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is None or mpi.COMM_WORLD.Get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
