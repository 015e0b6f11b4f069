"""Learning: models, objectives, samplers, data loaders, the DeepSpeed engine, tracking."""
