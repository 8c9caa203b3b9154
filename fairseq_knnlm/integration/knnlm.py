"""The kNN-LM a run's options describe: its datastore and retriever, and the optional
RetoMaton pointers and adaptive-retrieval predictor, opened and checked once.

The task holds one :class:`KNNLM` (``task.knnlm``); eval-lm's scorer and generation
turn it into the per-batch pipeline with :meth:`KNNLM.pipeline`.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from ..index.files import default_index_path
from ..index.load import open_index
from ..retrieval.adaptive import PredictedRows, RetrievalPredictor, load_for_run
from ..retrieval.base import Retriever, SearchNeighbours
from ..retrieval.pointers import PointerNeighbours, Pointers, build_pointers
from ..retrieval.retriever import KNNRetriever
from ..scoring.pipeline import KNNPipeline, NeighboursSaver, PipelineStats
from ..storage.datastore import Datastore, DatastoreError, dictionary_md5
from .flags import check_against_datastore

logger = logging.getLogger(__name__)


@dataclass
class KNNLM:
    datastore: Datastore
    retriever: Retriever
    index_path: str
    pointers: Optional[Pointers] = None  # --knn-pointers
    predictor: Optional[RetrievalPredictor] = None  # --knn-retrieval-predictor
    threshold: Optional[float] = None  # the predictor's score threshold

    def pipeline(self, lmbda: float, temperature: float, stats: Optional[PipelineStats] = None, cache=None,
                 saver: Optional[NeighboursSaver] = None) -> KNNPipeline:
        """The per-batch pipeline: neighbours from the pointers or the retriever, rows chosen
        by the predictor (every row without one), then the cache and the saver if given."""
        source = PointerNeighbours(self.pointers) if self.pointers is not None else SearchNeighbours(self.retriever)
        selector = PredictedRows(self.predictor, self.threshold) if self.predictor is not None else None
        return KNNPipeline(source, lmbda, temperature, selector=selector, cache=cache, saver=saver, stats=stats)


def open_knnlm(args, dictionary, checkpoint_sha256: Callable[[], Optional[str]]) -> KNNLM:
    """``--knnlm``'s datastore (checked against the options and ``dictionary``), its index
    (a file, a directory of pieces, or this rank's pieces of a distributed index), and the
    pointers and predictor the options ask for.  ``checkpoint_sha256()`` names the model,
    which a predictor must have been fit with."""
    datastore = Datastore(args.dstore, in_memory=args.dstore_in_memory)
    meta = datastore.meta
    check_against_datastore(args, datastore.size)
    if meta.get("keytype") != str(args.knn_keytype):
        raise DatastoreError(
            f"datastore {args.dstore} holds {meta.get('keytype')} keys but --knn-keytype is "
            f"{args.knn_keytype}; pass --knn-keytype {meta.get('keytype')}"
        )
    if meta.get("dictionary_md5") != dictionary_md5(dictionary):
        raise DatastoreError(
            f"datastore {args.dstore} was built with another dictionary "
            f"({meta.get('dictionary_size')} types) than {args.data} ({len(dictionary)} types); "
            "binarize the data with the model's dict.txt and rebuild the datastore"
        )
    datastore.check_values(len(dictionary), full=args.knn_check_datastore)
    index_path = args.knn_index or default_index_path(args.dstore)
    if args.knn_distributed_index:
        from ..retrieval.distributed import open_distributed_retriever  # torch.distributed only when asked

        retriever = open_distributed_retriever(args, datastore, index_path)
    else:
        index, index_meta = open_index(
            index_path, datastore, nprobe=args.probe, gpu=args.knn_gpu,
            faiss_params=args.knn_faiss_params, mmap=args.knn_index_mmap,
        )
        retriever = KNNRetriever(datastore, index, index_meta, args.k, args.knn_sim_func,
                                 candidates=args.knn_candidates)
    knnlm = KNNLM(datastore, retriever, index_path)
    if args.knn_retrieval_predictor:
        # Refused in one line if fit for another model, datastore or keytype.
        identity = dict(
            checkpoint_sha256=checkpoint_sha256(),
            dictionary_md5=dictionary_md5(dictionary),
            dstore_fingerprint=datastore.fingerprint,
            dstore_size=datastore.size,
            keytype=str(args.knn_keytype),
        )
        knnlm.predictor, knnlm.threshold = load_for_run(args, identity, logger)
    if args.knn_pointers:
        knnlm.pointers = build_pointers(args, datastore, retriever, index_path)
    return knnlm
