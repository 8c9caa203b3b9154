"""Shared fixtures: a tiny real fairseq LM trained on a slice of WikiText-2, and
the artefacts several test files use (datastores, indexes, the stock baseline run).

The LM, its binarized data and the train datastore come from the real fairseq
command-line tools in subprocesses, the way users make them; later artefacts
and most evaluations run the same code in this process (``eval_lm_in_process``
is the stock fairseq-eval-lm main()), and tests whose subject is a console
script run that script.  Each artefact is built once per test session, by its
fixture: no test reads files another test wrote.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_knnlm")
WIKITEXT2 = Path(os.environ.get("WIKITEXT2_DIR", ROOT.parent / "shared" / "data" / "wikitext-2"))

# Slice sizes in bytes of the WikiText-2 files: big enough for a model that
# has learnt something, small enough to train in seconds on 2 cores.
SLICE_BYTES = {"train": 400_000, "valid": 40_000, "test": 40_000}
TOKENS_PER_SAMPLE = 128
CONTEXT_WINDOW = 64

PPL_RE = re.compile(r"Loss \(base 2\): (-?[0-9.]+), Perplexity: ([0-9.]+)")


def run(cmd, check=True, **kwargs):
    """Run a command, returning CompletedProcess with text output (stdout+stderr merged)."""
    # PASSIVE: idle OpenMP threads of torch and FAISS sleep instead of spinning on the 2 cores.
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    )
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}")
    return proc


def perplexity_line(output: str):
    """(loss, perplexity) as fairseq-eval-lm printed them, as strings (exact digits)."""
    found = PPL_RE.findall(output)
    assert found, f"no perplexity line in output:\n{output[-3000:]}"
    return found[-1]


def eval_lm(data_bin, checkpoint, *extra, task="knnlm_language_modeling", split="valid",
            tokens_per_sample=TOKENS_PER_SAMPLE, context_window=CONTEXT_WINDOW, check=True):
    cmd = [
        "fairseq-eval-lm", data_bin, "--path", checkpoint, "--gen-subset", split,
        "--tokens-per-sample", tokens_per_sample, "--context-window", context_window,
        "--cpu", "--max-tokens", 4096, "--num-workers", 0, "--no-progress-bar",
    ]
    if task != "language_modeling":
        cmd += ["--user-dir", USER_DIR]
    cmd += ["--task", task, *extra]
    return run(cmd, check=check)


def eval_lm_in_process(data_bin, checkpoint, *flags, split="valid"):
    """The stock fairseq-eval-lm main() in this process, our task on ``split``: (loss, perplexity)
    at full float precision (the log line rounds the perplexity to 2 decimals)."""
    import fairseq_cli.eval_lm as eval_lm_module
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(data_bin), "--path", str(checkpoint), "--gen-subset", split,
            "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--context-window", str(CONTEXT_WINDOW),
            "--cpu", "--max-tokens", "4096", "--num-workers", "0", "--no-progress-bar",
            "--user-dir", USER_DIR, "--task", "knnlm_language_modeling", *map(str, flags)]
    scorer = eval_lm_module.SequenceScorer
    try:
        args = options.parse_args_and_arch(options.get_eval_lm_parser(), argv)
        results = eval_lm_module.main(convert_namespace_to_omegaconf(args))
    finally:
        eval_lm_module.SequenceScorer = scorer  # the task swaps in its scorer
    return float(results["loss"]), float(results["perplexity"])


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS at one thread for a module's in-process searches: its OpenMP threads spin
    while waiting, and on a busy 2-core machine one thread is several times faster."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    return tmp_path_factory.mktemp("knnlm")


@pytest.fixture(scope="session")
def data_bin(artefacts):
    raw = artefacts / "raw"
    raw.mkdir()
    for split, nbytes in SLICE_BYTES.items():
        text = (WIKITEXT2 / f"{split}.txt").read_bytes()[:nbytes]
        (raw / f"{split}.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    out = artefacts / "data-bin"
    run([
        "fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt",
        "--validpref", raw / "valid.txt", "--testpref", raw / "test.txt",
        "--destdir", out, "--workers", 1,
    ])
    return out


def train_tiny_lm(data_bin, save_dir, arch_args, max_epoch=2):
    run([
        "fairseq-train", data_bin, "--task", "language_modeling", *arch_args,
        "--tokens-per-sample", TOKENS_PER_SAMPLE, "--sample-break-mode", "none",
        "--max-tokens", 4096, "--optimizer", "adam", "--lr", 0.003,
        "--max-epoch", max_epoch, "--cpu", "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--no-last-checkpoints", "--log-format", "simple", "--seed", 1, "--num-workers", 0,
    ])
    return save_dir / "checkpoint_best.pt"


# The paper's architecture in miniature: pre-norm transformer with adaptive
# input and adaptive softmax.
TINY_TRANSFORMER = [
    "--arch", "transformer_lm", "--decoder-layers", 2, "--decoder-embed-dim", 64,
    "--decoder-ffn-embed-dim", 128, "--decoder-attention-heads", 2,
    "--decoder-normalize-before", "--decoder-input-dim", 64, "--decoder-output-dim", 64,
    "--adaptive-input", "--adaptive-input-cutoff", "2000,6000",
    "--adaptive-softmax-cutoff", "2000,6000", "--tie-adaptive-weights",
    "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
]


@pytest.fixture(scope="session")
def tiny_lm(artefacts, data_bin):
    return train_tiny_lm(data_bin, artefacts / "ckpt", TINY_TRANSFORMER)


@pytest.fixture(scope="session")
def tiny_datastore(artefacts, data_bin, tiny_lm):
    """A real datastore: the tiny LM's keys over the train slice."""
    dstore = artefacts / "dstore-train"
    eval_lm(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", dstore, split="train")
    return dstore


def quiet(message):
    pass


def build_flat_index(dstore):
    """DSTORE/flat.index: the exact (Flat, l2) index of a datastore."""
    from fairseq_knnlm.index import build_index

    output = dstore / "flat.index"
    build_index(str(dstore), output=str(output), factory="Flat", progress=False, log=quiet)
    return output


def refusal(data_bin, checkpoint, *flags):
    """The one-line error eval-lm stops with, in process (test_fault_injection.py checks that the
    console script prints such an error as its one last line, with exit code 2)."""
    from fairseq_knnlm.errors import UserError

    with pytest.raises(UserError) as raised:
        eval_lm_in_process(data_bin, checkpoint, *flags)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture(scope="session")
def flat_index(tiny_datastore):
    """The exact (Flat, l2) index of the tiny datastore."""
    return build_flat_index(tiny_datastore)


@pytest.fixture(scope="session")
def valid_datastore(artefacts, data_bin, tiny_lm):
    """The valid split's own keys and targets (last_ffn_input, fp32): the queries eval-lm searches with."""
    dstore = artefacts / "dstore-valid"
    eval_lm_in_process(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", dstore)
    return dstore


@pytest.fixture(scope="session")
def valid_self_index(valid_datastore):
    """The exact (Flat, l2) index of the valid split's own keys: every query finds itself."""
    return build_flat_index(valid_datastore)


@pytest.fixture(scope="session")
def stock_valid(data_bin, tiny_lm):
    """The output of the stock fairseq-eval-lm (task language_modeling, no code of ours) on valid,
    with --output-word-probs (which prints each token's probability and leaves the perplexity as is)."""
    return eval_lm(data_bin, tiny_lm, "--output-word-probs", task="language_modeling").stdout
