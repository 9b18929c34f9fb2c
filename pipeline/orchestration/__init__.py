"""Running a pipeline's stages: keys, reuse, the results store, MLflow runs and the input checks before a run."""
