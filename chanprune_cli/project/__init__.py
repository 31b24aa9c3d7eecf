"""Working in a project directory: config files (`chanprune.toml`, `[tool.chanprune]`), what the
last commands did here (`.chanprune/last.json`), and the `chanprune run` pipeline."""
