"""comkd: ComKD-CLIP knowledge distillation for CLIP models."""
