"""MLflow: the pipeline's runs, stage runs, logged models and their lineage."""
