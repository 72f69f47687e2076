"""The run configuration: the typed TrainConfig, its TOML files and the recipes."""
