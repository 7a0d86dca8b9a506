"""Masked critique fine-tuning: critique masking that reaches the loss and a format term with a gradient."""
