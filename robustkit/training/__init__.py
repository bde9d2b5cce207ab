"""Training: the config and loop with checkpoints and resume (loop), optimizers and schedules,
batch mixing, the catastrophic-overfitting detector, gradient compression, and one module per
method family with its own needs (DAT, RiFT, distillation, visual prompting)."""
