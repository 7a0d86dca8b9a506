"""metareason-brevity: the plugin that docs/writing-a-plugin.md builds step by step."""
