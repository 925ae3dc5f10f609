"""Shared test helpers (tiny models, toy data, comparisons); tests import them as ``helpers.*``
(``tests/`` is on ``sys.path`` under pytest's default import mode)."""
