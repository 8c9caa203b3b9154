"""How the task reaches into the running fairseq-eval-lm: its scorer and its batch loop."""

import sys


class EvalLoopHooks:
    """Iterates like ``itr`` (and has its length); calls ``on_start`` before the
    first batch, ``on_end`` once it is exhausted and ``on_exit`` however the loop ends."""

    def __init__(self, itr, on_start, on_end, on_exit=None):
        self.itr = itr
        self.on_start = on_start
        self.on_end = on_end
        self.on_exit = on_exit

    def __len__(self):
        return len(self.itr)

    def __iter__(self):
        try:
            self.on_start()
            yield from self.itr
            self.on_end()
        finally:
            if self.on_exit is not None:
                self.on_exit()


def install_scorer(task):
    """Make the running fairseq-eval-lm build our scorer instead of SequenceScorer;
    returns the function that puts fairseq's back.

    fairseq_cli.eval_lm looks the name ``SequenceScorer`` up in its module
    globals when it builds the scorer (after asking for the data loader), so
    rebinding it there is enough.
    """
    from .scorer import KNNSequenceScorer

    def make_scorer(tgt_dict, softmax_batch=None, **kwargs):
        scorer = KNNSequenceScorer(tgt_dict, softmax_batch, task=task, **kwargs)
        task.active_scorer = scorer
        return scorer

    namespaces = [vars(m) for m in map(sys.modules.get, ("fairseq_cli.eval_lm", "__main__")) if m is not None]
    # eval-lm run without a module of its own (runpy without alter_sys, as
    # under ``python -m cProfile -m fairseq_cli.eval_lm``): its globals are on the stack.
    frame = sys._getframe()
    while frame is not None:
        namespaces.append(frame.f_globals)
        frame = frame.f_back
    patched = []
    for namespace in namespaces:
        if "SequenceScorer" in namespace and callable(namespace.get("eval_lm")):
            patched.append((namespace, namespace["SequenceScorer"]))
            namespace["SequenceScorer"] = make_scorer

    def restore():
        for namespace, original in reversed(patched):
            if namespace.get("SequenceScorer") is make_scorer:
                namespace["SequenceScorer"] = original

    return restore
