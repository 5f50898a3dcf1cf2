"""Shared fixtures: models cached in ``<repo>/.cache/tests/`` and a helper that runs the ``repgeo`` CLI.

Cached models are built in a temporary directory and renamed into place, so a killed run never leaves half a
model behind; delete ``.cache/tests`` to rebuild them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tests"
MPIEXEC = REPO / ".venv" / "bin" / "mpiexec"

#: Text the tiny tokenizer is trained on; the tests' prompts are written in the same words.
TINY_CORPUS = """\
A river carries sand, silt and clay from the hills to the sea. Rain loosens the soil and small streams gather it.
Heavy pebbles roll along the bottom, sand moves forward in short hops, and fine clay stays in the water.
The baker wakes before dawn, mixes flour, water, salt and yeast, and leaves the dough to rise in a warm room.
Bread that rises slowly tastes better: the yeast has time to turn sugars into gas and many small flavours.
A library keeps books, maps and letters; readers sit at long tables and the clock ticks over the quiet room.
Numbers like 3, 14, 159 and 2653 appear in tables, and the year 1789 appears in many history books.
Der Fluss trägt Sand und Ton ins Meer. La rivière porte le sable vers la mer. El río lleva arena al mar.
Cold air sinks and warm air rises, so the wind at the coast turns around between the day and the night.
"""

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_atomically(final: Path, build) -> Path:
    """Return ``final``, first creating it with ``build(tmp_dir)`` in a temporary directory renamed into place."""
    if final.is_dir():
        return final
    os.makedirs(CACHE, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=CACHE))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:  # another test session built it first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def train_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) trained on TINY_CORPUS that puts <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_llama(directory, tokenizer, seed: int = 0, scale_down_proj: dict | None = None,
                    max_positions: int = 512, vocab_size: int | None = None):
    """Save a random 4-layer, 64-dim Llama with ``tokenizer`` to ``directory``.

    scale_down_proj: block index → factor applied to that block's MLP down-projection (to provoke large values).
    vocab_size: rows of the embeddings (default: the tokenizer's; more, as real models pad theirs).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block, factor in (scale_down_proj or {}).items():
            model.model.layers[block].mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model():
    """Directory of a tiny random Llama (4 layers x 64 dims, vocab ~400) with its tokenizer; loads in ms."""
    return str(build_atomically(CACHE / "tiny-llama-v1", lambda d: save_tiny_llama(d, train_tiny_tokenizer())))


@pytest.fixture(scope="session")
def tiny_model_long():
    """``tiny_model`` taking prompts of up to 2048 tokens: researchers' 1024-token prompts at unit-test speed."""
    return str(build_atomically(CACHE / "tiny-llama-long-v1",
                                lambda d: save_tiny_llama(d, train_tiny_tokenizer(), max_positions=2048)))


@pytest.fixture(scope="session")
def tiny_model_other():
    """Like ``tiny_model`` with other random weights (same tokenizer and shapes): a different model."""
    return str(build_atomically(CACHE / "tiny-llama-seed1-v1",
                                lambda d: save_tiny_llama(d, train_tiny_tokenizer(), seed=1)))


@pytest.fixture(scope="session")
def tiny_model_overflowing():
    """``tiny_model`` with block 1's MLP output scaled by 1e8: |hidden| ~1e6 at layers 2 and 3, beyond float16."""
    return str(build_atomically(CACHE / "tiny-llama-overflow-v1",
                                lambda d: save_tiny_llama(d, train_tiny_tokenizer(), scale_down_proj={1: 1e8})))


def convert_gguf(alias: str, directory):
    """Save the packaged GGUF model ``alias`` de-quantised to float32 as a plain Hugging Face model directory.

    A GGUF that repgeo assembles (Gemma 3) goes to a throw-away cache: the tests never write to ~/.cache.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import resolve_model

    with tempfile.TemporaryDirectory() as cache, pytest.MonkeyPatch.context() as env:
        env.setenv("REPGEO_CACHE", cache)
        ref = resolve_model(alias)
        model = AutoModelForCausalLM.from_pretrained(ref.location, gguf_file=ref.gguf_file, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are de-quantized to float32: save them as a plain model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file).save_pretrained(directory)


@pytest.fixture(scope="session")
def smollm2_hf():
    """Directory of the real SmolLM2-135M (float32 HF format), converted once from the packaged GGUF."""
    return str(build_atomically(CACHE / "smollm2-135m-hf-v1", lambda d: convert_gguf("smollm2-135m", d)))


@pytest.fixture(scope="session")
def gemma3_hf():
    """Directory of the real Gemma 3 270M (float32 HF format, ~1.1 GB), converted once from the assembled GGUF
    (~42 s of de-quantisation)."""
    return str(build_atomically(CACHE / "gemma3-270m-hf-v1", lambda d: convert_gguf("gemma3-270m", d)))


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """The ``mpiexec`` of this checkout's environment (MPICH's hydra)."""
    return str(MPIEXEC)


def repgeo_argv(args, mpi: int | None = None, mpi_args=()) -> list:
    """The command line that runs ``repgeo ARGS`` from this checkout, under ``mpiexec -n MPI`` when given."""
    argv = [sys.executable, "-m", "toolkit.cli", *map(str, args)]
    if mpi:
        argv = [str(MPIEXEC), "-n", str(mpi), *map(str, mpi_args), *argv]
    return argv


def repgeo_env(env: dict | None = None) -> dict:
    """The environment of a CLI run: ours, offline hub, plus ``env``.

    OpenMP threads wait passively: on a shared machine, spinning torch threads starve the store writer and make
    small-model runs several times slower (results are the same either way).
    """
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", **(env or {}))


@pytest.fixture(scope="session")
def run_repgeo():
    """``run_repgeo(*args, mpi=None, mpi_args=(), env=None, timeout=300, cwd=None)`` → (returncode, stdout, stderr)."""

    def run(*args, mpi=None, mpi_args=(), env=None, timeout=300, cwd=None):
        proc = subprocess.run(repgeo_argv(args, mpi, mpi_args), env=repgeo_env(env), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture(scope="session")
def start_repgeo():
    """``start_repgeo(*args, mpi=None, mpi_args=(), env=None, cwd=None)`` → a running ``subprocess.Popen``."""

    def start(*args, mpi=None, mpi_args=(), env=None, cwd=None):
        return subprocess.Popen(repgeo_argv(args, mpi, mpi_args), env=repgeo_env(env), cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    return start


def write_jsonl_file(path, rows) -> Path:
    """Write ``rows`` (dicts) as a JSONL file and return its path."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, rows)`` → path: one JSON object per line."""
    return write_jsonl_file


def tiny_texts(n: int, seed: int, min_words: int = 8, max_words: int = 40) -> list:
    """``n`` texts of ``min_words``–``max_words`` words drawn from TINY_CORPUS (seeded)."""
    words = TINY_CORPUS.split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, int(rng.integers(min_words, max_words + 1)))) for _ in range(n)]


@pytest.fixture(scope="session")
def make_tiny_texts():
    """``make_tiny_texts(n, seed, min_words=8, max_words=40)`` → list of texts in the tiny tokenizer's words."""
    return tiny_texts


def store_arrays(path) -> dict:
    """Every array of a Zarr group: name → numpy array."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def assert_same_store(a, b):
    """Both stores hold the same arrays with the same dtypes and bitwise-equal contents (NaN included)."""
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        x, y = left[name], right[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == object:
            assert x.tolist() == y.tolist(), name
        else:
            differ = np.argwhere(x.view(np.uint8) != y.view(np.uint8))
            assert not len(differ), f"{name} differs at {len(differ)} bytes, first at {differ[0]}"


@pytest.fixture(scope="session")
def same_store():
    """``same_store(a, b)`` asserts that two stores hold bitwise-identical arrays."""
    return assert_same_store


def tree_state(path) -> dict:
    """Relative path → (size, mtime_ns, sha256) of every file under ``path`` (directories: (None, mtime_ns, None))."""
    path = Path(path)
    state = {".": (None, path.stat().st_mtime_ns, None)}
    for item in sorted(path.rglob("*")):
        st = item.stat()
        key = str(item.relative_to(path))
        if item.is_dir():
            state[key] = (None, st.st_mtime_ns, None)
        else:
            state[key] = (st.st_size, st.st_mtime_ns, hashlib.sha256(item.read_bytes()).hexdigest())
    return state


@pytest.fixture(scope="session")
def tree_snapshot():
    """``tree_snapshot(path)`` → comparable state of every file and directory under ``path``."""
    return tree_state


def error_line(stderr: str) -> str:
    """The one line a failed run prints, after checking there is no traceback and exactly one error line."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="session")
def the_error_line():
    """``the_error_line(stderr)`` → the single error line of a failed run (asserts there is exactly one)."""
    return error_line


class ManyPrompts:
    """120 prompts of different lengths for the tiny model, and their uninterrupted stores (1 and 2 ranks).

    The 2-rank run keeps each rank's stderr apart (``stderr_of_rank``) to tell which rank printed what.
    """

    N = 120

    def __init__(self, directory: Path, model: str, run):
        self.directory, self.model, self._run = directory, model, run
        self.path = write_jsonl_file(directory / "many.jsonl",
                                     [{"text": t, "i": i} for i, t in enumerate(tiny_texts(self.N, seed=0))])

    def args(self, out) -> list:
        # float32 keeps the last bits that a batch of other prompts (other padding) would change
        return ["extract", "--model", self.model, "--prompts", self.path, "--out", out, "--max-tokens", 64,
                "--batch-size", 4, "--dtype", "float32"]

    @functools.cached_property
    def store_1rank(self) -> Path:
        out = self.directory / "one-rank.zarr"
        code, _, err = self._run(*self.args(out))
        assert code == 0, err
        return out

    @functools.cached_property
    def store_2ranks(self) -> Path:
        out = self.directory / "two-ranks.zarr"
        code, _, err = self._run(*self.args(out), mpi=2,
                                 mpi_args=("-errfile-pattern", self.directory / "two-ranks.stderr.%r"))
        assert code == 0, err + self.stderr_of_rank(0) + self.stderr_of_rank(1)
        return out

    def stderr_of_rank(self, rank: int) -> str:
        path = self.directory / f"two-ranks.stderr.{rank}"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def many_prompts(tmp_path_factory, tiny_model, run_repgeo):
    """:class:`ManyPrompts` for the tiny model; its stores are extracted on first use, once per session."""
    return ManyPrompts(tmp_path_factory.mktemp("many"), tiny_model, run_repgeo)


#: Set to 1 to let the Slurm tests skip where no local cluster can start; otherwise they fail, so CI cannot hide it.
SKIP_SLURM_VARIABLE = "REPGEO_SKIP_SLURM"


def slurm_unavailable(reason: str):
    """Fail the calling test with ``reason``, or skip it when REPGEO_SKIP_SLURM=1 opts out of the Slurm tests."""
    if os.environ.get(SKIP_SLURM_VARIABLE) == "1":
        pytest.skip(f"{reason} ({SKIP_SLURM_VARIABLE}=1)")
    pytest.fail(f"{reason}; set {SKIP_SLURM_VARIABLE}=1 to skip the Slurm tests on purpose")


@pytest.fixture(scope="session")
def slurm_cluster():
    """``bin/slurm-local up``'s finished process (idempotent; the cluster stays up after the tests).

    Where it cannot start (not root, no apt-get, a failed set-up), the tests that need it fail, unless
    REPGEO_SKIP_SLURM=1.
    """
    import shutil

    if os.geteuid() != 0:
        slurm_unavailable("bin/slurm-local must run as root to start the Slurm daemons")
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        slurm_unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    try:
        up = subprocess.run([str(REPO / "bin" / "slurm-local"), "up"], env=env, capture_output=True, text=True,
                            timeout=600)
    except subprocess.TimeoutExpired:
        slurm_unavailable("bin/slurm-local up did not finish within 600 s")
    if up.returncode != 0:
        slurm_unavailable(f"bin/slurm-local up could not set up Slurm (exit {up.returncode}): {up.stderr[-2000:]}")
    return up
