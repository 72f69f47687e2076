"""What a process needs around the work: devices, torch.distributed, signals, file locks, safe file writes."""
