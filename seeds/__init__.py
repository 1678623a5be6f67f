"""The project's own seed tasks, shipped inside the wheel as ``ensemble_async.seeds``."""
