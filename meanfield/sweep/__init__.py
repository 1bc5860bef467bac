"""YAML sweeps: config (schema), plan (points and groups; experiment lookup), build (typed config ->
Model), points (per-point and per-chunk functions), schedule (which process computes which chunk),
watchdog (stalled chunks), run (lifecycle: run_experiment, merge_run, report), store (crash-safe
files), plots."""
