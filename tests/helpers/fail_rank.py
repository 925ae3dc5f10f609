"""``python -m fastgeffect.run`` whose rank ``FAIL_RANK`` fails at step ``FAIL_AT_STEP`` (tests only):
``FAIL_KIND=raise`` raises a RuntimeError there, ``FAIL_KIND=nan`` makes its objective non-finite."""
import os
import sys

from fastgeffect import run, unlearn
from fastgeffect.distributed import end_process

_train_step = unlearn.Unlearner.train_step


def failing_train_step(self, micro, plan):
    if self.rank == int(os.environ["FAIL_RANK"]) and self.step == int(os.environ["FAIL_AT_STEP"]):
        if os.environ.get("FAIL_KIND", "raise") == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank}")
        objective = self.objective

        def nan_objective(*args, **kwargs):
            objective(*args, **kwargs)  # the forward runs (under DDP a collective), then the check fails
            raise FloatingPointError("non-finite loss (injected)")
        self.objective = nan_objective
        try:
            return _train_step(self, micro, plan)
        finally:
            self.objective = objective
    return _train_step(self, micro, plan)


unlearn.Unlearner.train_step = failing_train_step

if __name__ == "__main__":
    end_process(run.main(sys.argv[1:]))  # as fastgeffect.run ends
