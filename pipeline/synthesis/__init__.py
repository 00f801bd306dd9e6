"""Synthesis evaluation (see docs/synthesis.md).

- :mod:`pipeline.synthesis.metrics`: seg / depth / normal agreement with the source labels; pixel and
  VAE-latent diversity.
- :mod:`pipeline.synthesis.judging`: the :class:`~pipeline.synthesis.judging.Judge` and
  :class:`~pipeline.synthesis.judging.JudgeFactory` protocols (models trained on real data that score
  synthetic images; the concrete one is :mod:`perception.judges`, passed in by the callers).
- :mod:`pipeline.synthesis.filter`: :class:`~pipeline.synthesis.filter.QualityFilter`, the per-image or
  per-pixel (FreeMask-style) quality filter used by ``expand``.
- :mod:`pipeline.synthesis.evaluate`: ``evaluate_synthesis`` (``lumen evaluate-synthesis``), built from
  :mod:`~pipeline.synthesis.inputs` (runs, settings, data), :mod:`~pipeline.synthesis.scoring` (variants
  scored per run and seed, cached) and :mod:`~pipeline.synthesis.render` (table, figure, grids).

Nothing heavy is imported here: the CLI registers its command through :mod:`lumen_cli.synthesis`
at every ``lumen`` start.
"""
