"""Where arrays live and how they persist: the device mesh, logical-axis sharding rules, compiling with XLA options,
Orbax checkpoints (layout, reading a run's config and parameters). Used by training, sampling and export alike."""
