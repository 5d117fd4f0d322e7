"""One training engine for pretraining and fine-tuning: config files with overrides, optimizer groups,
schedules, DeepSpeed, checkpoints with exact resume, metrics. The only place that knows DeepSpeed."""
