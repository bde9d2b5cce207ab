"""Results: the leaderboard store (SQLite) and its exports, RobustBench's model-info format, the
scaling report and plots."""
