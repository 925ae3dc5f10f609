"""The frozen original model θ_o, and per-sample reference log-probabilities cached once.

NPO/TNPO/WTNPO/DPO only need ``logp_ref`` of the forget answers, which never change during
unlearning: :class:`RefLogprobCache` computes them in one pass of θ_o and stores, per sample
index, the values at the sample's valid label positions. Training then needs no second model.
KL and RR regularisers do need θ_o; :class:`ReferenceModel` wraps either a separate frozen copy or,
for a PEFT model, the same model with its adapters disabled.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import torch

from .atomic_file import atomic_write
from .losses import token_logprobs, valid_mask


class ReferenceModel:
    """Frozen θ_o: a separate model, or a PEFT model whose adapters are disabled while it runs."""

    def __init__(self, model: torch.nn.Module, *, peft_adapters_off: bool = False, freeze: bool = True):
        self.model = model
        self.peft_adapters_off = peft_adapters_off
        if freeze and not peft_adapters_off:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_peft(cls, peft_model: torch.nn.Module) -> "ReferenceModel":
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("from_peft needs a PEFT model (with a disable_adapter() context)")
        return cls(peft_model, peft_adapters_off=True)

    @contextlib.contextmanager
    def _active(self):
        with torch.no_grad(), (self.model.disable_adapter() if self.peft_adapters_off else contextlib.nullcontext()):
            was_training = self.model.training
            self.model.eval()  # dropout off for the reference
            try:
                yield self.model
            finally:
                self.model.train(was_training)

    def forward(self, batch: Mapping[str, torch.Tensor], *, hidden_layer: Optional[int] = None):
        with self._active() as m:
            out = m(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    output_hidden_states=hidden_layer is not None)
        return out

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(batch).logits

    def hidden_states(self, batch: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
        """Hidden state after decoder block ``layer`` (0-based)."""
        return self.forward(batch, hidden_layer=layer).hidden_states[layer + 1]

    def token_logprobs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return token_logprobs(self.logits(batch), batch["labels"])


class RefLogprobCache:
    """Reference per-token log-probabilities of a dataset, keyed by sample index.

    Each entry is a 1-D fp32 tensor of the values at the sample's valid label positions, in order,
    so it can be scattered back into any padding of the same sample (:meth:`gather`).
    """

    def __init__(self, entries: Optional[Dict[int, torch.Tensor]] = None):
        self.entries: Dict[int, torch.Tensor] = dict(entries or {})

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, index: int) -> bool:
        return int(index) in self.entries

    @classmethod
    def compute(cls, reference: Union[ReferenceModel, torch.nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
                device: Optional[torch.device] = None) -> "RefLogprobCache":
        """One pass of θ_o over ``batches`` (dicts with input_ids, attention_mask, labels, index).
        A bare module is used as it is (not frozen): e.g. the model itself before unlearning."""
        ref = reference if isinstance(reference, ReferenceModel) else ReferenceModel(reference, freeze=False)
        cache = cls()
        for batch in batches:
            if "index" not in batch:
                raise KeyError("batches need an 'index' entry (the sample index in its split) to cache by")
            if device is not None:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logp = ref.token_logprobs(batch).float().cpu()
            mask = valid_mask(batch["labels"]).cpu()
            for row, i in enumerate(batch["index"].tolist()):
                cache.entries[int(i)] = logp[row][mask[row]].clone()
        return cache

    def gather(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T) reference log-probs aligned with ``labels`` (0 at invalid positions)."""
        mask = valid_mask(labels)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        for row, i in enumerate(index.tolist()):
            if int(i) not in self.entries:
                raise KeyError(f"sample {int(i)} has no cached reference log-probs")
            vals = self.entries[int(i)]
            n = int(mask[row].sum())
            if vals.numel() != n:
                raise ValueError(f"sample {int(i)}: cached {vals.numel()} reference values but the batch has {n} "
                                 "valid labels (different tokenizer, template or max length?)")
            out[row][mask[row]] = vals.to(out.device)
        return out

    def save(self, path: Union[str, Path]) -> None:
        """Atomic: an interrupted or failed save never leaves a half file under ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda f: torch.save(self.entries, f))
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError naming no file
            raise OSError(f"could not write the reference log-probs to {path}: {e}") from e

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RefLogprobCache":
        """ValueError naming ``path`` when it is not a complete cache (truncated, or another file)."""
        try:
            entries = torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:  # what torch raises
            raise ValueError(f"{path} is not a readable reference log-prob cache, truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(entries, dict) or not all(isinstance(k, int) and torch.is_tensor(v) and v.dim() == 1
                                                    for k, v in entries.items()):
            raise ValueError(f"{path} is not a reference log-prob cache (a dict of sample index → 1-D tensor)")
        return cls(entries)
