"""Built-in method plugins of metareason.

Each sub-package is one method and is declared in ``setup.py`` under the entry-point group
``metareason``, so it loads exactly like a pip-installed third-party plugin.
"""
