"""Synthesis evaluation (see docs/synthesis.md).

- :mod:`pipeline.synthesis.metrics`: seg / depth / normal agreement with the source labels; pixel and
  VAE-latent diversity.
- :mod:`pipeline.synthesis.judges`: perception models trained on real data that score synthetic images.
- :mod:`pipeline.synthesis.filter`: :class:`~pipeline.synthesis.filter.QualityFilter`, the per-image or
  per-pixel (FreeMask-style) quality filter used by ``expand``.
- :mod:`pipeline.synthesis.evaluate`: ``lumen evaluate-synthesis``, the comparison table and figure.

Nothing heavy is imported here: the CLI registers its command through :mod:`lumen_cli.synthesis`
at every ``lumen`` start.
"""
