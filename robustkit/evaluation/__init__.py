"""Evaluation: attack names and options (attack_spec), the batch runner with its resumable store
(runner), the grid of models x eps x attacks that writes leaderboard rows (grid), gradient-masking
checks (diagnostics), per-sample records and transfer surrogates."""
