"""Which options combine: every rule of integration/flags.py, a combination it accepts and
each one it refuses (with its message), on the task's own dataclass config; and README.md's
table, which must be the one the rules generate."""

import os
import re

import pytest
from omegaconf import OmegaConf

from fairseq_knnlm.errors import UserError
from fairseq_knnlm.integration.config import KNNLanguageModelingConfig
from fairseq_knnlm.integration.flags import (
    RULES,
    Bound,
    FlagError,
    check_against_datastore,
    check_flags,
    check_value,
    combination_table,
)

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
KNN = dict(knnlm=True, dstore="dstore")
PREDICTOR = dict(KNN, knn_retrieval_predictor="predictor.json")
CACHE = dict(knn_cache_size=100)
SAVE = dict(save_knnlm_dstore=True, dstore="dstore")


def config(**options):
    cfg = KNNLanguageModelingConfig()
    for name, value in options.items():
        assert hasattr(cfg, name), name
        setattr(cfg, name, value)
    return cfg


# (options, facts of the run, the start of the refusal's message)
REFUSED = [
    # adaptive retrieval
    (dict(knn_retrieval_fraction=0.5), {},
     "--knn-retrieval-fraction/--knn-retrieval-threshold need --knn-retrieval-predictor FILE"),
    (dict(knn_retrieval_threshold=0.1), {},
     "--knn-retrieval-fraction/--knn-retrieval-threshold need --knn-retrieval-predictor FILE"),
    (dict(knn_retrieval_predictor="p.json", knn_retrieval_fraction=0.5), {},
     "--knn-retrieval-predictor decides kNN searches; it needs --knnlm"),
    (dict(PREDICTOR, knn_retrieval_fraction=0.5, knn_save_neighbors="x.nbrs"), {},
     "--knn-save-neighbors saves every token's neighbours; run it without --knn-retrieval-predictor"),
    (PREDICTOR, {}, "with --knn-retrieval-predictor give one of --knn-retrieval-fraction F"),
    (dict(PREDICTOR, knn_retrieval_fraction=0.5, knn_retrieval_threshold=0.1), {},
     "with --knn-retrieval-predictor give one of --knn-retrieval-fraction F"),
    (dict(PREDICTOR, knn_retrieval_fraction=1.5), {}, "--knn-retrieval-fraction must lie in [0, 1], got 1.5"),
    # distributed search
    (dict(knn_distributed_index=True), {}, "--knn-distributed-index spreads the kNN-LM's index over the ranks: "
     "it needs --knnlm"),
    (dict(KNN, knn_distributed_index=True, knn_pointers=True), {},
     "--knn-pointers reads entries of the whole index in every process; drop --knn-distributed-index"),
    # pointers
    (dict(knn_pointers=True), {}, "--knn-pointers decides kNN searches; it needs --knnlm"),
    (dict(KNN, knn_pointers=True, knn_pointer_min_candidates=0), {},
     "--knn-pointer-min-candidates must be at least 1, got 0"),
    # continuous cache
    (dict(knn_cache_size=-1), {}, "--knn-cache-size must be 0 (no cache) or a number of tokens, got -1"),
    (dict(CACHE, knn_cache_lmbda=1.5), {}, "--knn-cache-lmbda must lie in [0, 1], got 1.5"),
    (dict(CACHE, knn_cache_lmbda=float("nan")), {}, "--knn-cache-lmbda must lie in [0, 1], got nan"),
    (dict(knn_cache_theta=-1.0), {}, "--knn-cache-theta must be a finite number >= 0"),
    (dict(knn_cache_theta=float("inf")), {}, "--knn-cache-theta must be a finite number >= 0"),
    (dict(CACHE, **SAVE), {}, "the datastore pass scores nothing with a cache: drop --knn-cache-size from "
     "--save-knnlm-dstore"),
    (CACHE, dict(num_shards=2), "--knn-cache-size holds the preceding tokens of one stream, which --num-shards / "
     "distributed evaluation splits into pieces; evaluate with one process"),
    (dict(CACHE, knn_save_neighbors="x.nbrs"), {}, "--knn-save-neighbors saves a kNN-LM's neighbours: add "
     "--knnlm --dstore DIR"),
    (dict(SAVE, knn_save_neighbors="x.nbrs"), {}, "--knn-save-neighbors saves a kNN-LM's neighbours"),
    (CACHE, dict(context_window=0), "--knn-cache-size needs fairseq-eval-lm's --context-window N (N > 0)"),
    (CACHE, dict(purpose="generate"), "--knn-cache-size is for fairseq-eval-lm (the cache holds the evaluated "
     "text's own previous tokens); drop it for generation"),
    # the two passes
    (dict(SAVE, knnlm=True), {}, "--save-knnlm-dstore and --knnlm are separate passes; give one"),
    (dict(save_knnlm_dstore=True), {}, "--dstore DIR is required with --save-knnlm-dstore and --knnlm"),
    (dict(knnlm=True), {}, "--dstore DIR is required with --save-knnlm-dstore and --knnlm"),
    (dict(knn_keytype="middle_layer"), {},
     "unknown --knn-keytype 'middle_layer'; choose one of last_ffn_input, last_layer_output"),
    # search
    (dict(SAVE, knn_overlap=True), {}, "--knn-overlap overlaps kNN searches; the datastore pass makes none"),
    (dict(KNN, knn_overlap=True), dict(purpose="generate"),
     "--knn-overlap is for fairseq-eval-lm (generation searches step by step); drop it"),
    (dict(knn_faiss_threads=0), {}, "--knn-faiss-threads must be at least 1, got 0"),
    (dict(knn_torch_threads=-2), {}, "--knn-torch-threads must be at least 1, got -2"),
    (dict(KNN, lmbda=1.5), {}, "--lmbda must lie in [0, 1], got 1.5"),
    (dict(KNN, lmbda=-0.1), {}, "--lmbda must lie in [0, 1], got -0.1"),
    (dict(KNN, k=0), {}, "--k must be at least 1, got 0"),
    (dict(KNN, k=16), dict(dstore_size=10), "--k 16 exceeds the datastore's 10 entries; lower --k"),
    (dict(KNN, knn_temp=0.0), {}, "--knn-temp must be positive, got 0.0"),
    (dict(KNN, probe=0), {}, "--probe must be at least 1, got 0"),
    (dict(KNN, k=16, knn_candidates=10), {}, "--knn-candidates 10 is below --k 16; give at least k"),
    (dict(KNN, k=16, knn_candidates=32), {}, "--knn-candidates 32 re-ranks by exact distances: add "
     "--knn-sim-func l2 (or ip for inner-product indexes), or drop --knn-candidates"),
    (dict(KNN, k=16, knn_candidates=32, knn_sim_func="l2"), dict(dstore_size=20),
     "--knn-candidates 32 exceeds the datastore's 20 entries; lower it"),
]

ACCEPTED = [
    ({}, {}),  # the plain language model
    (KNN, dict(num_shards=4, context_window=0, purpose="generate", dstore_size=2048)),
    (SAVE, dict(num_shards=2, context_window=0)),
    (dict(PREDICTOR, knn_retrieval_fraction=0.0), {}),
    (dict(PREDICTOR, knn_retrieval_fraction=1.0, knn_overlap=True), dict(purpose="eval")),
    (dict(PREDICTOR, knn_retrieval_threshold=-3.5), {}),
    (dict(KNN, knn_distributed_index=True), {}),
    (dict(KNN, knn_pointers=True, knn_pointer_min_candidates=1, knn_overlap=True, knn_save_neighbors="x"), {}),
    (dict(knn_pointer_min_candidates=0), {}),  # only read with --knn-pointers
    (dict(CACHE, knn_cache_theta=0.0, knn_cache_lmbda=1.0), dict(num_shards=1, context_window=512, purpose="eval")),
    (dict(KNN, **CACHE, knn_save_neighbors="x.nbrs", knn_overlap=True), dict(num_shards=1, context_window=1)),
    (dict(knn_keytype="last_layer_output", knn_faiss_threads=1, knn_torch_threads=3), {}),
    (dict(lmbda=1.5, k=0, knn_temp=0.0, probe=0, knn_candidates=1), {}),  # only read with --knnlm
    (dict(KNN, lmbda=0.0, k=1, knn_temp=1e-3, probe=1), dict(dstore_size=1)),
    (dict(KNN, lmbda=1.0, k=16, probe=None), dict(dstore_size=16)),
    (dict(KNN, k=16, knn_candidates=16), dict(dstore_size=16)),  # N = k: no re-ranking, any --knn-sim-func
    (dict(KNN, k=16, knn_candidates=32, knn_sim_func="l2"), dict(dstore_size=32)),
    (dict(KNN, k=16, knn_candidates=32, knn_sim_func="ip"), dict(dstore_size=32)),
]


@pytest.mark.parametrize("options, facts, message", REFUSED)
def test_each_refused_combination_says_what_to_do(options, facts, message):
    with pytest.raises(FlagError) as refused:
        check_flags(config(**options), **facts)
    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value) and isinstance(refused.value, UserError)


@pytest.mark.parametrize("options, facts", ACCEPTED)
def test_valid_combinations_are_accepted(options, facts):
    check_flags(config(**options), **facts)
    check_flags(OmegaConf.structured(config(**options)), **facts)  # what the task is given


def test_every_rule_is_exercised():
    patterns = [re.compile(re.sub(r"\\\{[^}]*\\\}", ".*", re.escape(rule.message))) for rule in RULES]
    hit = set()
    for options, facts, _ in REFUSED:
        with pytest.raises(FlagError) as refused:
            check_flags(config(**options), **facts)
        hit |= {i for i, p in enumerate(patterns) if p.fullmatch(str(refused.value))}
    assert hit == set(range(len(RULES))), [RULES[i].message for i in sorted(set(range(len(RULES))) - hit)]


def test_rules_on_run_facts_wait_for_them_and_recheck_runs_only_those():
    cfg = config(**CACHE)
    check_flags(cfg)  # sharding, context window and purpose not known yet
    with pytest.raises(FlagError, match="evaluate with one process"):
        check_flags(cfg, num_shards=2, context_window=0, recheck=("num_shards", "context_window"))
    # a re-check leaves alone what was checked at start-up...
    check_flags(config(knn_cache_size=100, knn_faiss_threads=0), purpose="eval", recheck=("purpose",))
    # ... and the datastore's size only meets the rules that need it
    check_against_datastore(config(k=0, knn_candidates=5), 4)
    with pytest.raises(FlagError, match="--knn-candidates 5 exceeds the datastore's 4 entries"):
        check_against_datastore(config(**KNN, k=2, knn_candidates=5, knn_sim_func="l2"), 4)


def test_check_value_applies_an_options_unconditional_bounds():
    check_value("--knn-cache-theta", 0.0)
    check_value("--knn-cache-lmbda", 1.0)
    with pytest.raises(FlagError, match=r"--knn-cache-lmbda must lie in \[0, 1\], got 2"):
        check_value("--knn-cache-lmbda", 2)
    with pytest.raises(FlagError, match="--knn-cache-theta must be a finite number >= 0"):
        check_value("--knn-cache-theta", float("nan"))
    check_value("--k", 0)  # its bounds hold with --knnlm only


def test_probe_defaults_to_the_index_own_nprobe():
    field = KNNLanguageModelingConfig.__dataclass_fields__["probe"]
    assert KNNLanguageModelingConfig().probe is None
    assert "saved in the index" in field.metadata["help"]


def test_readme_table_is_the_generated_one():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("#### Which options combine")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| Option |"))
    end = next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))
    assert "\n".join(lines[first:end]) + "\n" == combination_table()
    rows = {line.split(" | ")[0][2:] for line in lines[first + 2:end]}
    assert rows == {f"`{r.flag}`" if isinstance(r, Bound) else f"`{r.option.row}`" for r in RULES}
