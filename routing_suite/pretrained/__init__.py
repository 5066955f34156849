"""Real pretrained models made into organisms: loaded offline, fine-tuned with LoRA."""
