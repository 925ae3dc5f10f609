"""``python -m fastgeffect.run`` whose rank ``FAIL_RANK`` raises at step ``FAIL_AT_STEP`` (tests only)."""
import os
import sys

from fastgeffect import run, unlearn

_train_step = unlearn.Unlearner.train_step


def failing_train_step(self, micro):
    if self.rank == int(os.environ["FAIL_RANK"]) and self.step == int(os.environ["FAIL_AT_STEP"]):
        raise RuntimeError(f"injected failure on rank {self.rank}")
    return _train_step(self, micro)


unlearn.Unlearner.train_step = failing_train_step

if __name__ == "__main__":
    sys.exit(run.main(sys.argv[1:]))
