"""Which hidden state serves as the kNN key, captured with forward hooks.

No fairseq model code is copied or changed: a hook on the last decoder
layer's ``fc1`` sees the feed-forward block's input (after ``final_layer_norm``
in pre-norm models), and the decoder's features-only output is the final
hidden state.
"""

from typing import Optional

import torch

from ..errors import UserError

KEYTYPES = ("last_ffn_input", "last_layer_output")


class KeytypeError(UserError):
    pass


def check_keytype(keytype: str) -> None:
    if keytype not in KEYTYPES:
        raise KeytypeError(
            f"unknown --knn-keytype {keytype!r}; choose one of {', '.join(KEYTYPES)}"
        )


def last_ffn_module(model) -> torch.nn.Module:
    """The module whose input is the last decoder layer's FFN input."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    fc1 = getattr(layers[-1], "fc1", None) if layers else None
    if fc1 is None:
        raise KeytypeError(
            f"{type(model).__name__} has no decoder.layers[-1].fc1 to hook for "
            "--knn-keytype last_ffn_input; use a fairseq transformer_lm or "
            "--knn-keytype last_layer_output"
        )
    return fc1


def key_dim(model, keytype: str) -> int:
    check_keytype(keytype)
    if keytype == "last_ffn_input":
        return last_ffn_module(model).in_features
    decoder = model.decoder
    if getattr(decoder, "project_out_dim", None) is not None:
        return decoder.project_out_dim.out_features
    return decoder.output_embed_dim if hasattr(decoder, "output_embed_dim") else decoder.embed_dim


class KeyCapture:
    """Runs alongside a model's forward passes and exposes the key tensor.

    Usage::

        capture = KeyCapture(model, "last_ffn_input")
        features, extra = model(**net_input, features_only=True)
        keys = capture.keys(features)          # (batch, time, dim)
        capture.remove()
    """

    def __init__(self, model, keytype: str):
        check_keytype(keytype)
        self.keytype = keytype
        self._captured: Optional[torch.Tensor] = None
        self._handle = None
        if keytype == "last_ffn_input":
            self._handle = last_ffn_module(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self._captured = inputs[0]

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """Keys of the last forward pass, batch-first like ``features``."""
        if self.keytype == "last_layer_output":
            return features
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the hooked layer did not run in the last forward pass")
        # fairseq decoder layers run time-first (T x B x C).
        return captured.transpose(0, 1)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
