"""LoRA training (`qimg train-lora`): datasets and buckets, the training loop, LoRA files."""
