"""YAML sweeps: config (schema), plan (points and groups), build (config -> model), run
(batched execution), store (crash-safe files), plots."""
