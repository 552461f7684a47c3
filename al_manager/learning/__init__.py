"""Active learning: ``config`` (the typed TOML), ``loop`` (the manager and its steps), ``state`` (the work
directory's state and lock), ``sampling`` (parallel i-PI + driver runs that flag frames), ``initial_data``
with ``normal_modes`` and ``fps``, ``measure`` (harmonic and validation errors) and ``report`` (CSV, curve)."""
