"""Disentangling memory and reasoning (arXiv 2411.13504): step-type tokens, prompt-tuning, error attribution."""
