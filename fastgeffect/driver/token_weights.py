"""The per-token objective weights of the first forget samples, recorded before unlearning and at
every epoch end into ``token_weights.jsonl`` (the report's heat-map), and kept exact across resumes."""
from __future__ import annotations

from pathlib import Path
from typing import List, Set

import torch

from .. import distributed as dist_
from ..data.collate import collate_pairs
from ..data.unlearning import UnlearningData
from ..jsonl import append_jsonl, read_jsonl, truncate_jsonl
from ..objectives import Objective
from ..training.batches import to_device


def token_weight_rows(objective: Objective, model, data: UnlearningData, tokenizer, epoch: int, step: int,
                      device, n: int = 3) -> List[dict]:
    """Per-token objective weights of the first ``n`` forget samples (for the heat-map)."""
    items = [data.pairs[i] for i in range(min(n, len(data.pairs)))]
    batch = to_device(collate_pairs(items), device)
    was = model.training
    model.eval()
    with torch.no_grad():
        _, details = objective.forget_loss(model, batch)
    dist_.reshard(model)
    model.train(was)
    if "weights" not in details:
        return []
    rows = []
    f = batch[objective.term.needs_batches[0]]  # the batch the term weighs (PO: the refusals)
    for r in range(f["labels"].shape[0]):
        mask = details["mask"][r]
        ids = f["labels"][r][mask].tolist()
        rows.append({"step": step, "epoch": epoch, "index": int(f["index"][r]),
                     "tokens": tokenizer.convert_ids_to_tokens(ids), "weights": details["weights"][r][mask].tolist()})
    return rows


def resume_token_weights(path: Path, step: int) -> Set[int]:
    """Drop the token-weight rows recorded after the saved ``step`` (the resumed run records them
    again) and a torn last line; the epochs whose rows remain. Rows at ``step`` itself stay: an
    epoch's rows are recorded after its state is saved, and a run resumed from that state does not
    pass that epoch end again."""
    if not path.exists():
        return set()
    truncate_jsonl(path, step + 1)
    return {r["epoch"] for r in read_jsonl(path)}


class TokenWeightLog:
    """``token_weights.jsonl``: one set of rows per epoch (0: before unlearning), each recorded once."""

    def __init__(self, path: Path, objective: Objective, data: UnlearningData, tokenizer, device) -> None:
        self.path, self.objective, self.data, self.tokenizer, self.device = path, objective, data, tokenizer, device
        self.recorded: Set[int] = set()  # epochs whose rows are in the file

    def resume(self, step: int) -> None:
        """Continue the file of a run resumed at ``step`` (every rank learns which epochs it holds)."""
        self.recorded.update(dist_.broadcast_object(resume_token_weights(self.path, step) if dist_.is_main()
                                                    else None))

    def record(self, model, epoch: int, step: int) -> None:
        if epoch in self.recorded:  # recorded before the state this run resumed from
            return
        # every rank runs the forward (a sharded model needs all of them); the main one writes
        rows = token_weight_rows(self.objective, model, self.data, self.tokenizer, epoch, step, self.device)
        if dist_.is_main():
            append_jsonl(self.path, rows)
        self.recorded.add(epoch)

    def start(self, model, step: int, start_epoch: int, start_batch: int) -> None:
        """The rows of the weights training starts from: the target's (step -1), or those of the epoch end
        the state was saved at (the state is saved before its epoch's rows are recorded)."""
        if step == 0:
            self.record(model, 0, -1)
        elif start_batch == 0:
            self.record(model, start_epoch, step)
