"""The --save-knnlm-dstore pass, checked against fairseq itself."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary, data_utils

from conftest import refusal, CONTEXT_WINDOW, TOKENS_PER_SAMPLE, USER_DIR, eval_lm, eval_lm_in_process, perplexity_line, run
from fairseq_knnlm.storage.datastore import Datastore, DatastoreError


def split_tokens(data_bin, split):
    """The binarized split as one token stream, independent of our code."""
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data_bin / split), dictionary)
    return np.concatenate([dataset[i].numpy() for i in range(len(dataset))])


def load_model(checkpoint):
    models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)])
    return models[0].eval()


def reference_keys(model, stream, eos, positions, keytype):
    """Keys recomputed from scratch: run the model on exactly the context eval-lm
    gives target ``t`` (blocks of tokens_per_sample - context_window targets,
    each preceded by up to context_window earlier source tokens) and read the
    state at t's position with an independent hook."""
    block = TOKENS_PER_SAMPLE - CONTEXT_WINDOW
    source = np.concatenate([[eos], stream[:-1]])  # source token for every target
    captured = {}
    layer = model.decoder.layers[-1]
    handle = layer.final_layer_norm.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("ffn_in", out)
    )
    keys = []
    try:
        for t in positions:
            start = max(0, (t // block) * block - CONTEXT_WINDOW)
            tokens = torch.from_numpy(source[start : t + 1]).long().unsqueeze(0)
            with torch.no_grad():
                features, _ = model(tokens, features_only=True)
            if keytype == "last_ffn_input":
                keys.append(captured["ffn_in"][-1, 0].numpy())
            else:
                keys.append(features[0, -1].numpy())
    finally:
        handle.remove()
    return np.stack(keys)


def test_without_knn_flags_task_matches_stock_language_modeling(data_bin, tiny_lm, stock_valid):
    ours = eval_lm(data_bin, tiny_lm)
    assert perplexity_line(ours.stdout) == perplexity_line(stock_valid)


@pytest.mark.parametrize("keytype", ["last_ffn_input", "last_layer_output"])
def test_datastore_values_and_keys_match_fairseq(tmp_path, data_bin, tiny_lm, stock_valid, keytype):
    dstore = tmp_path / f"dstore-valid-{keytype}"
    out = eval_lm(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", dstore, "--knn-keytype", keytype)
    # The pass still reports the LM's own perplexity, identical to the stock one.
    assert perplexity_line(out.stdout) == perplexity_line(stock_valid)

    store = Datastore(dstore)
    stream = split_tokens(data_bin, "valid")
    assert store.size == len(stream)
    np.testing.assert_array_equal(store.vals, stream)
    assert store.vals.dtype == np.int32 and store.keys.dtype == np.float32

    meta = json.loads((dstore / "meta.json").read_text())
    assert meta["keytype"] == keytype and meta["split"] == "valid"
    assert meta["context_window"] == CONTEXT_WINDOW and meta["tokens_per_sample"] == TOKENS_PER_SAMPLE
    assert meta["dictionary_size"] == len(Dictionary.load(str(data_bin / "dict.txt")))

    model = load_model(tiny_lm)
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(len(stream), size=24, replace=False))
    positions[:2] = [0, TOKENS_PER_SAMPLE - CONTEXT_WINDOW]  # a block start and the first carried context
    expected = reference_keys(model, stream, model.decoder.dictionary.eos(), positions, keytype)
    np.testing.assert_allclose(np.asarray(store.keys[positions]), expected, rtol=1e-4, atol=1e-4)


def test_fp16_keys(tmp_path, data_bin, tiny_lm, valid_datastore):
    fp16 = tmp_path / "dstore-valid-fp16"
    eval_lm_in_process(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", fp16, "--dstore-fp16")
    a, b = Datastore(valid_datastore), Datastore(fp16)
    assert b.keys.dtype == np.float16 and b.meta["keys_dtype"] == "float16"
    np.testing.assert_array_equal(a.vals, b.vals)
    np.testing.assert_allclose(np.asarray(b.keys, dtype=np.float32), a.keys, rtol=2e-3, atol=2e-3)


def test_complete_break_mode(tmp_path, data_bin, tiny_lm):
    dstore = tmp_path / "dstore-complete"
    loss, ppl = eval_lm_in_process(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", dstore,
                                   "--sample-break-mode", "complete")
    stock = eval_lm(data_bin, tiny_lm, "--sample-break-mode", "complete", task="language_modeling")
    assert perplexity_line(stock.stdout) == (f"{loss:.4f}", f"{ppl:.2f}")  # as eval-lm prints them
    # eval-lm skips blocks longer than the model's 128 positions; in complete
    # mode such a block is one over-long line, so the store holds every other line.
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    lines = data_utils.load_indexed_dataset(str(data_bin / "valid"), dictionary)
    kept = [lines[i].numpy() for i in range(len(lines)) if len(lines[i]) <= TOKENS_PER_SAMPLE]
    np.testing.assert_array_equal(Datastore(dstore).vals, np.concatenate(kept))


def test_two_shards_equal_single_process(tmp_path, data_bin, tiny_lm, valid_datastore):
    single = valid_datastore
    sharded = tmp_path / "dstore-sharded"
    procs = [
        subprocess.Popen(
            ["fairseq-eval-lm", str(data_bin), "--path", str(tiny_lm), "--gen-subset", "valid",
             "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--context-window", str(CONTEXT_WINDOW),
             "--cpu", "--max-tokens", "4096", "--num-workers", "0", "--user-dir", USER_DIR,
             "--task", "knnlm_language_modeling", "--save-knnlm-dstore", "--dstore", str(sharded),
             "--num-shards", "2", "--shard-id", str(shard)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for shard in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, out[-3000:]
    a, b = Datastore(single), Datastore(sharded)
    assert b.meta["num_shards"] == 2 and a.size == b.size
    np.testing.assert_array_equal(a.vals, b.vals)
    np.testing.assert_allclose(b.keys[:], a.keys[:], rtol=1e-5, atol=1e-5)


def test_interrupted_pass_is_never_accepted_and_rerun_completes(tmp_path, data_bin, tiny_lm):
    dstore = tmp_path / "dstore-interrupted"
    cmd = ["fairseq-eval-lm", str(data_bin), "--path", str(tiny_lm), "--gen-subset", "train",
           "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--context-window", str(CONTEXT_WINDOW),
           "--cpu", "--max-tokens", "512", "--num-workers", "0", "--user-dir", USER_DIR,
           "--task", "knnlm_language_modeling", "--save-knnlm-dstore", "--dstore", str(dstore)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_keys = tmp_path / "dstore-interrupted.partial" / "keys.npy"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial_keys.exists() and partial_keys.stat().st_size > 200_000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "pass finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dstore.exists()
    with pytest.raises(DatastoreError):
        Datastore(dstore)
    run(cmd)
    assert Datastore(dstore).size == len(split_tokens(data_bin, "train"))
    assert not (tmp_path / "dstore-interrupted.partial").exists()


def test_refusals(artefacts, data_bin, tiny_lm, tiny_datastore):
    assert refusal(data_bin, tiny_lm, "--save-knnlm-dstore").startswith("--dstore DIR is required")
    # fairseq's own parser refuses a key type that does not exist, as its one last line
    proc = eval_lm(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", artefacts / "x", "--knn-keytype", "bogus",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert "error: argument --knn-keytype: invalid choice: 'bogus'" in proc.stdout.strip().splitlines()[-1]
    blocker = artefacts / "a-file"
    blocker.write_text("not a directory")
    assert refusal(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", blocker / "dstore").startswith(
        f"cannot create {blocker}: ")
    before = (tiny_datastore / "keys.npy").stat().st_mtime_ns
    last = refusal(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", tiny_datastore)
    assert "already holds a complete datastore" in last and "--dstore-overwrite" in last
    assert (tiny_datastore / "keys.npy").stat().st_mtime_ns == before
    assert not (artefacts / "x").exists()


def test_model_without_hooked_module_is_refused(data_bin):
    from fairseq import options, tasks

    from fairseq_knnlm.integration.keys import KeyCapture, KeytypeError

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(data_bin), "--task", "language_modeling", "--arch", "lstm_lm", "--cpu"]
    )
    model = tasks.setup_task(args).build_model(args)
    with pytest.raises(KeytypeError, match="no decoder.layers\\[-1\\].fc1"):
        KeyCapture(model, "last_ffn_input")
    KeyCapture(model, "last_layer_output").remove()  # the final state needs no hook


@pytest.mark.slow
def test_distributed_launch_writes_one_shard_per_rank(tmp_path, data_bin, tiny_lm, valid_datastore):
    """fairseq's own distributed mode (here torchrun, 2 CPU processes, gloo)."""
    single = valid_datastore
    dstore = tmp_path / "dstore-distributed"
    eval_lm_cmd = (
        f"exec fairseq-eval-lm {data_bin} --path {tiny_lm} --gen-subset valid "
        f"--tokens-per-sample {TOKENS_PER_SAMPLE} --context-window {CONTEXT_WINDOW} --cpu "
        f"--max-tokens 4096 --num-workers 0 --user-dir {USER_DIR} --task knnlm_language_modeling "
        f"--save-knnlm-dstore --dstore {dstore} --distributed-backend gloo "
        "--distributed-world-size 2 --distributed-no-spawn --distributed-init-method env:// "
        "--distributed-rank $RANK"
    )
    run(["torchrun", "--nproc_per_node", 2, "--master_port", 29000 + os.getpid() % 1000,
         "--no-python", "bash", "-c", eval_lm_cmd], env={"OMP_NUM_THREADS": "1"})
    a, b = Datastore(single), Datastore(dstore)
    assert b.meta["num_shards"] == 2
    np.testing.assert_array_equal(a.vals, b.vals)
    np.testing.assert_allclose(b.keys[:], a.keys[:], rtol=1e-5, atol=1e-5)
