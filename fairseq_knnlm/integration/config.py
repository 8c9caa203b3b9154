"""The task's options: fairseq's language_modeling options plus every kNN-LM flag.

Which of them combine, and the values they take, are checked by :mod:`.flags`.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks.language_modeling import LanguageModelingConfig

from ..scoring import knn_math
from .keys import KEYTYPES


@dataclass
class KNNLanguageModelingConfig(LanguageModelingConfig):
    # Datastore pass
    save_knnlm_dstore: bool = field(
        default=False,
        metadata={"help": "write the datastore (context key, next token) of --gen-subset to --dstore"},
    )
    dstore: Optional[str] = field(
        default=None, metadata={"help": "datastore directory (written by --save-knnlm-dstore, read by --knnlm)"}
    )
    knn_keytype: ChoiceEnum(KEYTYPES) = field(
        default="last_ffn_input",
        metadata={"help": "hidden state used as key: last_ffn_input (paper's best) or last_layer_output"},
    )
    dstore_fp16: bool = field(default=False, metadata={"help": "store keys as float16"})
    dstore_overwrite: bool = field(
        default=False, metadata={"help": "replace an existing complete datastore at --dstore"}
    )
    # kNN-LM evaluation
    knnlm: bool = field(
        default=False,
        metadata={"help": "interpolate the LM with kNN retrieval from --dstore (README.md, 'Which options "
                  "combine': what each option needs and excludes)"},
    )
    knn_index: Optional[str] = field(
        default=None, metadata={"help": "FAISS index of the datastore (default: DSTORE/knn.index), or a "
                                "directory of index shards (fairseq-knnlm-build-index --trained ...), searched in place"}
    )
    knn_index_mmap: bool = field(
        default=False, metadata={"help": "memory-map the index's inverted lists instead of reading them into "
                                 "RAM (same results; merged sharded indexes are always on disk)"}
    )
    k: int = field(default=1024, metadata={"help": "number of neighbours retrieved"})
    lmbda: float = field(default=0.25, metadata={"help": "kNN interpolation weight λ"})
    probe: Optional[int] = field(
        default=None,
        metadata={"help": "nprobe: IVF lists visited per search (default: the nprobe saved in the index by "
                  "fairseq-knnlm-build-index, 32 unless built with another --nprobe)"},
    )
    knn_temp: float = field(default=1.0, metadata={"help": "softmax temperature over -distances"})
    knn_sim_func: ChoiceEnum(knn_math.SIM_FUNCS) = field(
        default="faiss",
        metadata={"help": "faiss: the index's distances; l2: exact squared L2 from stored keys; ip: inner product"},
    )
    dstore_in_memory: bool = field(default=False, metadata={"help": "load keys and values into RAM"})
    knn_check_datastore: bool = field(
        default=False,
        metadata={"help": "scan every value (and count) of --dstore against the dictionary and every key for "
                  "NaN/inf at start-up; without it, stores above 16M entries trust the ranges their writer "
                  "recorded (smaller ones are always scanned)"},
    )
    knn_gpu: bool = field(default=False, metadata={"help": "search the index on all visible GPUs"})
    knn_distributed_index: bool = field(
        default=False,
        metadata={"help": "under fairseq's distributed launch, rank r of W holds the pieces i % W == r of the "
                  "--knn-index directory and every batch is searched over all ranks' pieces (same results as "
                  "searching them in one process)"},
    )
    # Search speed (index/search_params.py, retrieval/overlap.py)
    knn_faiss_params: Optional[str] = field(
        default=None,
        metadata={"help": "FAISS search parameters in ParameterSpace syntax, applied after --probe, e.g. "
                  "quantizer_efSearch=64 (HNSW coarse quantizer), k_factor_rf=4 (RFlat refine), ht=..."},
    )
    knn_candidates: Optional[int] = field(
        default=None,
        metadata={"help": "search N >= k candidates and keep the k nearest by exact distance "
                  "(needs --knn-sim-func l2 or ip; default: k, i.e. no re-ranking)"},
    )
    knn_faiss_threads: Optional[int] = field(
        default=None, metadata={"help": "OpenMP threads of FAISS searches (default: FAISS's, OMP_NUM_THREADS)"}
    )
    knn_torch_threads: Optional[int] = field(
        default=None, metadata={"help": "torch threads of the model (torch.set_num_threads; default: torch's)"}
    )
    knn_overlap: bool = field(
        default=False,
        metadata={"help": "search each batch in a worker thread while the model computes the next "
                  "(fairseq-eval-lm; same results as without)"},
    )
    knn_save_neighbors: Optional[str] = field(
        default=None, metadata={"help": "save every scored token's neighbours here for fairseq-knnlm-sweep"}
    )
    knn_save_neighbors_fp16: bool = field(default=False, metadata={"help": "store saved distances as float16"})
    knn_save_neighbors_overwrite: bool = field(
        default=False, metadata={"help": "replace an existing --knn-save-neighbors file"}
    )
    # Adaptive retrieval (retrieval/adaptive.py)
    knn_retrieval_predictor: Optional[str] = field(
        default=None,
        metadata={"help": "search only the tokens this predictor (fairseq-knnlm-sweep --save-predictor) "
                  "selects from the LM's own distribution; the others keep the LM's probability"},
    )
    knn_retrieval_fraction: Optional[float] = field(
        default=None,
        metadata={"help": "with --knn-retrieval-predictor: search the fraction of tokens it was tuned for "
                  "(one of the fractions saved in the file; 1 = every token, 0 = none)"},
    )
    knn_retrieval_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "with --knn-retrieval-predictor: search tokens whose predictor score is at "
                  "least this (instead of --knn-retrieval-fraction)"},
    )
    # Pointers between consecutive entries, RetoMaton (retrieval/pointers.py)
    knn_pointers: bool = field(
        default=False,
        metadata={"help": "score a token with the successors (entry i+1) of the previous token's neighbours "
                  "whose value was the observed token, searching only when too few remain"},
    )
    knn_pointer_min_candidates: int = field(
        default=64,
        metadata={"help": "with --knn-pointers: search when fewer than this many candidates remain "
                  "(above --k: every token is searched, as without pointers)"},
    )
    # Continuous cache of the evaluated text (scoring/cache.py)
    knn_cache_size: int = field(
        default=0,
        metadata={"help": "continuous cache (Grave et al., 2017): also predict each token from the keys and next "
                  "tokens of the N scored tokens before it, in corpus order (0: no cache); with or without --knnlm"},
    )
    knn_cache_theta: float = field(
        default=0.3, metadata={"help": "cache flatness θ: entry i weighs exp(θ · key_t · key_i) (0: all the same)"}
    )
    knn_cache_lmbda: float = field(
        default=0.1,
        metadata={"help": "cache interpolation weight λ_c: p = (1 - λ_c) · p_kNN-LM (or p_LM) + λ_c · p_cache"},
    )
