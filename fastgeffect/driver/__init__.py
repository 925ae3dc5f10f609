"""The pieces of ``python -m fastgeffect.run``: its command line (``cli``), paper presets
(``presets``), the target model (``targets``), the run folder (``run_folder``), launches on several
processes (``launch``), evaluation (``evaluation``) and the study that ties them (``study``)."""
