"""Training: the DeepSpeed engine around the model, the step loop, checkpoints and logs."""
