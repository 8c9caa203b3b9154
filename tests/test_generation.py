"""kNN-LM generation: sampling, beam search and hub scoring with a datastore attached.

The generation path (forward hooks, full-vocabulary kNN distribution) is
cross-checked against the evaluation path (KNNSequenceScorer, the code behind
fairseq-eval-lm --knnlm), against the stock fairseq LM at λ = 0, and by
memorisation: with a datastore of a text and λ near 1, greedy decoding from
the text's first words writes out the rest of it.
"""

import math

import pytest
import torch
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

from conftest import USER_DIR, eval_lm_in_process, run
from fairseq_knnlm.integration.generation import (
    GenerationError,
    StepKeys,
    attach_knnlm,
    detach_knnlm,
    is_attached,
    knnlm_log_probs,
    search_count,
)
from fairseq_knnlm.integration.hub import from_pretrained, knnlm_task_overrides
from fairseq_knnlm.scoring import knn_math
from fairseq_knnlm.integration.keys import KEYTYPES, KeyCapture
from fairseq_knnlm.integration.scorer import KNNSequenceScorer

K, LMBDA, KNN_TEMP = 16, 0.5, 1.0
SENTENCES = ["The game was released in Japan .", "In 1998 , the band toured Europe with a new album ."]
PROMPTS = ["The game was", "In 1998 , the band"]
# Every word is in the WikiText-2 slice's dictionary; the text itself is not in WikiText.
MEMO_TEXT = (
    "The old bridge keeper crossed the river every morning . He counted the boats , wrote their "
    "names in a small book and returned home before noon . His daughter later sold the book to "
    "a museum in London ."
)


@pytest.fixture(scope="module")
def knn_hub(tiny_lm, data_bin, tiny_datastore, flat_index):
    return from_pretrained(
        str(tiny_lm.parent), tiny_lm.name, str(data_bin), dstore=str(tiny_datastore),
        knn_index=str(flat_index), k=K, lmbda=LMBDA, knn_temp=KNN_TEMP,
    ).eval()


@pytest.fixture(scope="module")
def plain_hub(tiny_lm, data_bin):
    """The stock fairseq language_modeling hub: no code of ours in its generation path."""
    return TransformerLanguageModel.from_pretrained(str(tiny_lm.parent), tiny_lm.name, str(data_bin)).eval()


def lm_sample(hub, token_rows):
    """A batch as LanguageModelingTask.build_dataset_for_inference makes it: eos + tokens -> tokens."""
    d = hub.task.source_dictionary
    bsz, tsz = len(token_rows), max(len(t) for t in token_rows)
    src = torch.full((bsz, tsz), d.pad(), dtype=torch.long)
    tgt = torch.full((bsz, tsz), d.pad(), dtype=torch.long)
    for i, toks in enumerate(token_rows):
        src[i, 0] = d.eos()
        src[i, 1 : len(toks)] = toks[:-1]
        tgt[i, : len(toks)] = toks
    lengths = torch.tensor([len(t) for t in token_rows])
    return {"id": torch.arange(bsz), "net_input": {"src_tokens": src, "src_lengths": lengths}, "target": tgt}


def eval_lm_scores(hub, sample):
    """Per-token kNN-LM log-probs from KNNSequenceScorer, the fairseq-eval-lm --knnlm code."""
    model = hub.models[0]
    detach_knnlm(model)  # the scorer wants the plain LM's probabilities; generate() re-attaches
    scorer = KNNSequenceScorer(hub.task.target_dictionary, task=hub.task)
    hypos = scorer.generate([model], sample)
    scorer.finish()
    return [h[0]["positional_scores"] for h in hypos]


# ---------------------------------------------------------------- the maths
def test_distribution_sums_to_one_even_with_missing_neighbours():
    torch.manual_seed(0)
    vocab, k = 50, 6
    lm = torch.log_softmax(torch.randn(3, vocab), -1)
    dists = torch.rand(3, k) * 4
    vals = torch.randint(0, vocab, (3, k))
    dists[1, 4:], vals[1, 4:] = math.inf, -1  # partly filled
    dists[2], vals[2] = math.inf, -1  # nothing found
    vals[0, 1] = vals[0, 0]  # a token two neighbours vote for
    for lmbda in (0.0, 0.3, 1.0):
        mixed = knnlm_log_probs(lm, dists, vals, lmbda, temperature=2.0)
        assert torch.allclose(mixed.exp().sum(-1), torch.ones(3), atol=1e-5)
        assert torch.equal(mixed[2], lm[2])  # no neighbours: the LM alone
        # The sparse update equals the dense formula of knn_math.
        dense = knn_math.interpolate(lm, knn_math.knn_vocab_log_probs(dists, vals, vocab, 2.0), lmbda)
        assert torch.allclose(mixed[:2], dense[:2], atol=1e-6)
    # λ = 1 is the neighbour weights scattered onto their tokens.
    weights = torch.softmax(-dists[0] / 2.0, -1)
    expected = torch.zeros(vocab).index_add_(0, vals[0], weights)
    assert torch.allclose(knnlm_log_probs(lm, dists, vals, 1.0, 2.0)[0].exp(), expected, atol=1e-6)


# ------------------------------------------------------------------ the keys
def test_incremental_step_keys_equal_the_datastore_keys(plain_hub):
    """Token by token, the hooks see the same keys a datastore pass stores, for both
    key types, with adaptive softmax (the tiny LM) and with a plain output projection."""
    cfg = TransformerLanguageModelConfig(
        decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32, decoder_attention_heads=2,
        decoder_input_dim=16, decoder_output_dim=16, tokens_per_sample=64, max_target_positions=64,
    )
    untrained = TransformerLanguageModel.build_model(cfg, plain_hub.task).eval()
    torch.manual_seed(0)
    tokens = torch.randint(4, 100, (3, 7))
    for model in (plain_hub.models[0], untrained):
        for keytype in KEYTYPES:
            capture = KeyCapture(model, keytype)
            with torch.no_grad():
                expected = capture.keys(model(tokens, features_only=True)[0])
            capture.remove()
            step_keys, state, got = StepKeys(model, keytype), {}, []
            with torch.no_grad():
                for t in range(tokens.size(1)):
                    out = model.decoder(tokens[:, : t + 1], incremental_state=state)
                    out[0].div_(2.0)  # as SequenceGenerator applies its temperature, in place
                    got.append(step_keys.take(3, 1))
            step_keys.remove()
            assert torch.allclose(torch.cat(got, 1), expected, atol=1e-5), (type(model.decoder), keytype)


# ----------------------------------------------- generation vs. evaluation
def test_full_distribution_agrees_with_eval_lm_scorer(knn_hub):
    scored = knn_hub.score(SENTENCES)  # hub score(): fairseq's SequenceScorer through our model
    model = knn_hub.models[0]
    attach_knnlm(model, knn_hub.task)  # attaching again must not stack a second kNN layer
    sample = lm_sample(knn_hub, [s["tokens"] for s in scored])
    target = sample["target"]
    with torch.no_grad():
        full = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    mask = target.ne(knn_hub.task.source_dictionary.pad())
    assert torch.allclose(full.exp().sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-4)
    at_target = full.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    reference = eval_lm_scores(knn_hub, sample)
    for i, ref in enumerate(reference):
        assert torch.allclose(at_target[i][mask[i]], ref, atol=1e-4)
        assert torch.allclose(scored[i]["positional_scores"], ref, atol=1e-4)
    with torch.no_grad():  # detached: the plain LM, which kNN must have changed
        plain = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    assert not torch.allclose(plain.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask], at_target[mask], atol=1e-2)


def test_incremental_beam_search_one_search_per_step_agrees_with_eval_lm(knn_hub):
    model = knn_hub.models[0]
    knn_hub.score(SENTENCES[0])  # attaches
    retriever = knn_hub.task.knnlm.retriever
    steps, rows = [], []
    search = retriever.search
    hook = model.decoder.layers[0].register_forward_pre_hook(lambda m, i: steps.append(i[0].shape[:2]))
    retriever.search = lambda q, **kw: rows.append(q.size(0)) or search(q, **kw)
    try:
        before = search_count(model)
        hypos = knn_hub.generate([knn_hub.encode(p) for p in PROMPTS], beam=3, max_len_b=14)
    finally:
        hook.remove()
        del retriever.search
    # Incremental: every decoder pass is one new position for every live hypothesis,
    # and all of them go to FAISS together.
    assert all(t == 1 for t, _ in steps)
    assert rows == [b for _, b in steps] and rows[0] == len(PROMPTS) * 3
    assert search_count(model) - before == len(steps)

    best = [h[0] for h in hypos]
    reference = eval_lm_scores(knn_hub, lm_sample(knn_hub, [h["tokens"] for h in best]))
    for hypo, ref in zip(best, reference):
        assert torch.allclose(hypo["positional_scores"], ref, atol=1e-3)


def test_lambda_zero_samples_exactly_like_the_plain_lm(tiny_lm, data_bin, tiny_datastore, flat_index, plain_hub):
    knn0 = from_pretrained(
        str(tiny_lm.parent), tiny_lm.name, str(data_bin), dstore=str(tiny_datastore),
        knn_index=str(flat_index), k=K, lmbda=0.0,
    ).eval()
    prompts = [plain_hub.encode(p) for p in PROMPTS]

    def sample(hub):
        torch.manual_seed(1234)
        return [h[0] for h in hub.generate(prompts, beam=2, sampling=True, sampling_topk=20, max_len_b=25)]

    ours, stock = sample(knn0), sample(plain_hub)
    for a, b in zip(ours, stock):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["positional_scores"], b["positional_scores"])
    assert is_attached(knn0.models[0]) and search_count(knn0.models[0]) == 0
    assert not is_attached(plain_hub.models[0])


# ------------------------------------------------------------ memorisation
def test_greedy_decoding_continues_a_memorised_text_verbatim(artefacts, data_bin, tiny_lm, plain_hub):
    work = artefacts / "generation-memo"
    work.mkdir()
    (work / "memo.txt").write_text(MEMO_TEXT + "\n")
    run(["fairseq-preprocess", "--only-source", "--srcdict", data_bin / "dict.txt",
         "--testpref", work / "memo.txt", "--destdir", work / "bin", "--workers", 1])
    dstore = work / "dstore"
    eval_lm_in_process(work / "bin", tiny_lm, "--save-knnlm-dstore", "--dstore", dstore, split="test")
    index = dstore / "knn.index"
    run(["fairseq-knnlm-build-index", "--dstore", dstore, "--index-factory", "Flat", "--output", index])

    words = MEMO_TEXT.split()
    prompt = " ".join(words[:4])
    (work / "prompt.txt").write_text(prompt + "\n")
    out = run([
        "fairseq-interactive", data_bin, "--user-dir", USER_DIR, "--task", "knnlm_language_modeling",
        "--path", tiny_lm, "--knnlm", "--dstore", dstore, "--knn-index", index, "--k", 8,
        "--lmbda", 0.99, "--knn-temp", 0.01, "--beam", 1, "--max-len-a", 0, "--max-len-b", len(words) + 5,
        "--cpu", "--input", work / "prompt.txt",
    ]).stdout
    hypo = [line.split("\t")[2] for line in out.splitlines() if line.startswith("H-0\t")]
    assert hypo == [MEMO_TEXT], out[-2000:]
    # The LM alone does not know the text.
    assert plain_hub.sample(prompt, beam=1, max_len_b=len(words)) != MEMO_TEXT


# ----------------------------------------------------------------- errors
def test_attaching_needs_a_knnlm_task(plain_hub):
    with pytest.raises(GenerationError, match="--knnlm --dstore"):
        attach_knnlm(plain_hub.models[0], plain_hub.task)
    with pytest.raises(GenerationError, match="not task="):
        knnlm_task_overrides(task="knnlm_language_modeling")


def test_a_knnlm_hub_leaves_eval_lm_in_the_same_process_alone(tiny_lm, data_bin, tiny_datastore, flat_index):
    """Only a running fairseq-eval-lm gets the kNN scorer: loading and using a kNN-LM
    hub must not make a later eval-lm in the same process (a notebook) score with it."""
    import fairseq_cli.eval_lm as eval_lm_module
    from fairseq.sequence_scorer import SequenceScorer

    hub = from_pretrained(str(tiny_lm.parent), tiny_lm.name, str(data_bin), dstore=str(tiny_datastore),
                          knn_index=str(flat_index), k=K, lmbda=LMBDA, knn_temp=KNN_TEMP).eval()
    hub.score(["The game was released in Japan ."])
    assert eval_lm_module.SequenceScorer is SequenceScorer
