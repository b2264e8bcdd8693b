"""Target hidden states out of a (KV-cache) forward, for draft heads.

What ModelOpt's speculative plugins train on, and so what a head must be fed at inference:

* EAGLE-3 (``megatron_eagle._transformer_layer_forward_hook``): the OUTPUT of the decoder layers
  whose 0-based index (``layer_number - 1``) is in ``eagle_aux_hidden_state_layer_ids`` (default
  ``{1, L//2 - 1, L - 4}``), concatenated in layer order -> [s, b, n * h];
* EAGLE-1 and Medusa: the decoder's output, i.e. AFTER the final norm (the GPTModel's decoder
  applies ``final_layernorm`` on the last stage; the plugins read ``self.decoder(...)`` or
  ``GPTModel.forward`` with ``post_process`` off, which both return it).

:class:`HiddenCapture` registers forward hooks only for the forward it wraps, so plain decoding
(no drafter asking) runs without any. At TP > 1 the residual stream is replicated (no sequence
parallelism in inference), so every TP rank captures the same values; at PP > 1 each stage
fills the slots of its own layers and one all-reduce over the pipeline group gives every rank
the whole (:func:`~post_training.runtime.collectives.pp_sum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from post_training.runtime.collectives import pp_sum

__all__ = ["HiddenSpec", "HiddenCapture"]


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden states a drafter needs: the outputs of ``layers`` (0-based, ModelOpt's
    aux ids), then, with ``final``, the final-normed decoder output."""

    layers: tuple[int, ...] = ()
    final: bool = False

    @property
    def parts(self) -> int:
        return len(self.layers) + int(self.final)


class HiddenCapture:
    """``with HiddenCapture(model, spec) as cap: model forward`` then ``cap.result(s, b)``:
    [s, b, spec.parts * h] in the model's dtype, the same on every rank of the model."""

    def __init__(self, model, spec: HiddenSpec) -> None:
        self.model, self.spec = model, spec
        self.got: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def _keep(self, slot: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.got[slot] = out.detach().clone()  # later layers may reuse buffers in place
        return hook

    def __enter__(self) -> "HiddenCapture":
        self.got.clear()
        slot = {layer_id: i for i, layer_id in enumerate(self.spec.layers)}
        for layer in self.model.decoder.layers:
            i = slot.get(layer.layer_number - 1)  # global layer number, 1-based
            if i is not None:
                self.handles.append(layer.register_forward_hook(self._keep(i)))
        if self.spec.final and self.model.post_process:
            self.handles.append(self.model.decoder.register_forward_hook(self._keep(len(self.spec.layers))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def result(self, s: int, b: int) -> torch.Tensor:
        cfg = self.model.config
        out = torch.zeros(s, b, self.spec.parts, cfg.hidden_size, dtype=cfg.params_dtype,
                          device=next(self.model.parameters()).device)
        for i, t in self.got.items():
            out[:, :, i] = t
        self.got.clear()
        return pp_sum(out).view(s, b, -1)
