"""Metacognitive reuse (arXiv 2509.13237): a behavior handbook extracted, retrieved, cited and distilled."""
