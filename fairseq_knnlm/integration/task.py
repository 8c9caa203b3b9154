"""The ``knnlm_language_modeling`` task: fairseq's language_modeling plus kNN-LM.

Without kNN flags it behaves exactly like ``language_modeling``.  With
``--save-knnlm-dstore`` or ``--knnlm`` it makes the stock ``fairseq-eval-lm``
score with :class:`~fairseq_knnlm.integration.scorer.KNNSequenceScorer`.
"""

import logging
import os

from fairseq.data import iterators
from fairseq.data import LMContextWindowDataset
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingTask

from ..scoring.cache import cache_enabled
from ..errors import UserError, install_excepthook
from ..index.search_params import set_threads
from ..storage.datastore import DatastoreError, check_can_write, dictionary_md5, shard_dirname
from ..storage.files import file_sha256
from .config import KNNLanguageModelingConfig
from .eval_loop import EvalLoopHooks, install_scorer
from .flags import check_flags
from .keys import KeyCapture, key_dim
from .knnlm import open_knnlm

logger = logging.getLogger(__name__)


def _planned_sharding(cfg):
    """(num_shards, shard_id) as fairseq-eval-lm will pass them to eval_lm_dataloader."""
    root = _root_config(cfg)
    if root is None or "dataset" not in root:
        return 1, 0
    dist = root.get("distributed_training", {}) or {}
    num_shards = max(root.dataset.num_shards, dist.get("distributed_world_size", 1) or 1)
    shard_id = max(root.dataset.shard_id, dist.get("distributed_rank", 0) or 0)
    return num_shards, shard_id


def _root_config(cfg):
    """The whole fairseq config that ``cfg`` (the task node) belongs to, if any."""
    get_parent = getattr(cfg, "_get_parent", None)
    return get_parent() if get_parent is not None else None


@register_task("knnlm_language_modeling", dataclass=KNNLanguageModelingConfig)
class KNNLanguageModelingTask(LanguageModelingTask):
    """language_modeling with a kNN-LM datastore pass and kNN-LM scoring."""

    @classmethod
    def add_args(cls, parser):
        # Only fairseq's CLIs parse a task's options: from here on our UserErrors end
        # them with one line (the hub and library users keep ordinary exceptions).
        install_excepthook()
        super().add_args(parser)

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self.knnlm = None  # --knnlm: datastore, retriever, pointers, predictor (knnlm.py)
        self.first_scored_id = 0
        self.split = None
        self.active_scorer = None
        self._checkpoint_sha256 = None
        self.context_window, self.num_shards, self.shard_id = 0, 1, 0
        self.lookahead = None  # --knn-overlap: eval-lm's batches, one ahead (retrieval/overlap.py)
        check_flags(args, num_shards=_planned_sharding(args)[0])
        if args.save_knnlm_dstore or args.knnlm:
            self._set_up(args)
        elif cache_enabled(args):  # LM + continuous cache: the scorer without a datastore
            set_threads(args.knn_faiss_threads, args.knn_torch_threads)

    # ------------------------------------------------------------------ set-up
    def _set_up(self, args):
        """The datastore pass's output, or the kNN-LM's datastore, index and retriever."""
        set_threads(args.knn_faiss_threads, args.knn_torch_threads)
        if args.save_knnlm_dstore:
            self.num_shards, self.shard_id = _planned_sharding(args)
            if self.num_shards > 1 and os.path.exists(os.path.join(args.dstore, "meta.json")):
                if not args.dstore_overwrite:
                    raise DatastoreError(
                        f"{args.dstore} already holds a complete single-process datastore; "
                        "pass --dstore-overwrite or choose another --dstore"
                    )
            check_can_write(self.dstore_output_dir(), args.dstore_overwrite)
            return
        if args.knn_save_neighbors:
            from ..storage.neighbors import NeighborsError

            self.num_shards, self.shard_id = _planned_sharding(args)
            check_can_write(
                self.neighbors_output_path(), args.knn_save_neighbors_overwrite,
                what="neighbours file", option="--knn-save-neighbors",
                overwrite_flag="--knn-save-neighbors-overwrite", error=NeighborsError,
            )
        self.knnlm = open_knnlm(args, self.dictionary, self._model_sha256)

    def _model_sha256(self):
        """The checkpoint's sha256 (computed once), or None when eval-lm names no single file."""
        root = _root_config(self.args)
        path = root.common_eval.path if root is not None and "common_eval" in root else None
        if path and os.path.isfile(path) and self._checkpoint_sha256 is None:
            self._checkpoint_sha256 = file_sha256(path)
        return self._checkpoint_sha256

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        if self.args.save_knnlm_dstore or self.args.knnlm or cache_enabled(self.args):
            KeyCapture(model, self.args.knn_keytype).remove()  # fails early if un-hookable
            dim = key_dim(model, self.args.knn_keytype)
            if self.knnlm is not None and dim != self.knnlm.datastore.dim:
                raise DatastoreError(
                    f"the model's {self.args.knn_keytype} keys have dimension {dim} but datastore "
                    f"{self.args.dstore} has {self.knnlm.datastore.dim}; use the datastore built with this model"
                )
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        self.split = split
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def run_info(self) -> dict:
        """What the datastore and neighbour files record about the run."""
        root = _root_config(self.args)
        path = None
        if root is not None and "common_eval" in root:
            path = root.common_eval.path
        if path and self._checkpoint_sha256 is None:
            self._checkpoint_sha256 = file_sha256(path)
        return dict(
            checkpoint=os.path.abspath(path) if path else None,
            checkpoint_sha256=self._checkpoint_sha256,
            data=os.path.abspath(self.args.data),
            split=self.split,
            dictionary_size=len(self.dictionary),
            dictionary_md5=dictionary_md5(self.dictionary),
            keytype=str(self.args.knn_keytype),
            context_window=self.context_window,
            tokens_per_sample=self.args.tokens_per_sample + self.context_window,
            sample_break_mode=str(self.args.sample_break_mode),
        )

    def dstore_output_dir(self) -> str:
        if self.num_shards == 1:
            return self.args.dstore
        return os.path.join(self.args.dstore, shard_dirname(self.shard_id, self.num_shards))

    def neighbors_output_path(self) -> str:
        path = self.args.knn_save_neighbors
        if self.num_shards == 1:
            return path
        return os.path.join(path, shard_dirname(self.shard_id, self.num_shards))

    # ------------------------------------------------------------ evaluation
    def eval_lm_dataloader(
        self,
        dataset,
        max_tokens=36000,
        batch_size=None,
        max_positions=None,
        num_shards=1,
        shard_id=0,
        num_workers=1,
        data_buffer_size=10,
        context_window=0,
    ):
        self.context_window = context_window
        # the sharding and context window eval-lm actually asks for
        check_flags(self.args, num_shards=num_shards, context_window=context_window,
                    recheck=("num_shards", "context_window"))
        writes = self.args.save_knnlm_dstore or self.args.knn_save_neighbors
        if writes and (num_shards, shard_id) != (self.num_shards, self.shard_id):
            raise RuntimeError(
                f"eval-lm asked for shard {shard_id}/{num_shards}, the task planned "
                f"{self.shard_id}/{self.num_shards}"
            )
        self.num_shards, self.shard_id = num_shards, shard_id
        if num_shards == 1:
            itr = super().eval_lm_dataloader(
                dataset, max_tokens, batch_size, max_positions, 1, 0,
                num_workers, data_buffer_size, context_window,
            )
        else:
            itr = self._contiguous_shard(
                dataset, max_tokens, batch_size, max_positions, num_shards, shard_id,
                num_workers, data_buffer_size, context_window,
            )
        if not (self.args.save_knnlm_dstore or self.args.knnlm or cache_enabled(self.args)):
            return itr
        if self.args.knn_overlap:
            from ..retrieval.overlap import Lookahead

            itr = self.lookahead = Lookahead(itr)
        # Only the running eval-lm gets our scorer (not the hub or generation in the
        # same process), and only until its loop ends.
        restore = install_scorer(self)
        return EvalLoopHooks(itr, on_start=self._check_scorer_installed, on_end=self.finish_eval_lm,
                              on_exit=restore)

    def _contiguous_shard(
        self, dataset, max_tokens, batch_size, max_positions, num_shards, shard_id,
        num_workers, data_buffer_size, context_window,
    ):
        """This shard's contiguous run of batches, primed with the preceding context.

        fairseq's own sharding deals batches round-robin, which breaks the
        context carried from block to block; here shard i gets the i-th
        contiguous slice of the single-process batches, preceded by just
        enough earlier samples to rebuild the context a single process would
        have had.  Rows of those priming samples are not scored
        (``first_scored_id``).
        """
        if context_window > 0:
            dataset = LMContextWindowDataset(
                dataset=dataset,
                tokens_per_sample=self.args.tokens_per_sample,
                context_window=context_window,
                pad_idx=self.source_dictionary.pad(),
            )
        batches = self.get_batch_iterator(
            dataset=dataset,
            max_tokens=max_tokens,
            max_sentences=batch_size,
            max_positions=max_positions,
            ignore_invalid_inputs=True,
            num_workers=num_workers,
            data_buffer_size=data_buffer_size,
        ).frozen_batches
        lo = len(batches) * shard_id // num_shards
        hi = len(batches) * (shard_id + 1) // num_shards
        mine = [list(b) for b in batches[lo:hi]]
        self.first_scored_id = int(mine[0][0]) if mine else 0
        if mine and context_window > 0 and self.first_scored_id > 0:
            priming, tokens = [], 0
            for idx in range(self.first_scored_id - 1, -1, -1):
                priming.insert(0, idx)
                tokens += dataset.num_tokens(idx)
                if tokens >= context_window:
                    break
            mine.insert(0, priming)
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=mine,
            num_workers=num_workers,
            buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def build_generator(self, models, args, **kwargs):
        """fairseq-generate / fairseq-interactive / hub sample() and score(): with
        --knnlm, every model's normalized probabilities become the kNN-LM's."""
        check_flags(self.args, purpose="generate", recheck=("purpose",))
        if self.args.knnlm:
            from .generation import attach_knnlm

            for model in models:
                attach_knnlm(model, self)
        return super().build_generator(models, args, **kwargs)

    def _check_scorer_installed(self):
        """eval-lm builds its scorer before the first batch; if it is not ours, the
        run would print the plain LM's perplexity (or write no datastore) silently."""
        if self.active_scorer is None:
            raise UserError(
                "fairseq-eval-lm built fairseq's SequenceScorer instead of KNNSequenceScorer; "
                "run the fairseq-eval-lm console script or python -m fairseq_cli.eval_lm"
            )

    def finish_eval_lm(self):
        serve = getattr(self.knnlm.retriever, "serve_until_done", None) if self.knnlm is not None else None
        if serve is not None:  # --knn-distributed-index: answer the other ranks until all are done
            serve()
        if self.active_scorer is not None:
            self.active_scorer.finish()
