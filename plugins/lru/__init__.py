"""ZeroModel: MLA attention with a Latent Reasoning Unit (LRU) and ACT halting."""
