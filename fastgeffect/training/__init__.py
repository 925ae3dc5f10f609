"""The parts of the unlearning loop (:mod:`fastgeffect.unlearn`): the step plan, the batches, the
data-parallel reductions of counts and logs, a step's objective logs, its record and the run's
logs, and the engine backends with checkpointing."""
