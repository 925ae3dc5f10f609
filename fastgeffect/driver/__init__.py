"""The pieces of ``python -m fastgeffect.run``: its settings (``config``: :class:`~.config.RunConfig`),
its command line (``cli``), paper presets (``presets``), the target model (``targets``), the run folder
(``run_folder``), launches on several processes (``launch``), evaluation (``evaluation``), the
token-weight log (``token_weights``) and the study that ties them (``study``)."""
