"""Production IR campaigns: ``config`` (the typed TOML and the plan), ``runner`` (i-PI + batched drivers,
resume, trust region), ``report`` (spectra, sums, plots, ``summary.json``). Arrows: runner -> report -> config."""
