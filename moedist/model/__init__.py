"""Single-device model math (no torch.distributed, no ray)."""
