"""Run under ``torchrun --nproc_per_node 2``: GEffectCallback (``callbacks=[...]``) on the GA Trainer under DDP (gloo),
one forget row per rank and micro-batch, so each step's global batch is the whole forget batch.
Writes the main rank's G-effect log and each rank's logged values to the folder in argv[1]."""
import json
import sys
from pathlib import Path

import torch

from fastgeffect.distributed import end_process
from fastgeffect.integrations.hf import GEffectCallback
from helpers.ga_trainer import FORGET, RETAIN, ga_trainer
from helpers.tiny_models import tiny_llama

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cb = GEffectCallback({"unlearn": FORGET, "retain": RETAIN}, out=str(out / "geffect.jsonl"))
    trainer = ga_trainer(out / "run", tiny_llama(seed=0), lr=0.0, per_device=1, ddp_backend="gloo", callbacks=[cb])
    assert trainer.args.world_size == 2
    trainer.train()
    logged = [h for h in trainer.state.log_history if "geffect/unlearn/total" in h]
    (out / f"logged{trainer.args.process_index}.json").write_text(json.dumps(logged))
    end_process(0)  # as fastgeffect.run ends: the group torn down, no interpreter teardown (gloo aborts)
