"""The pipeline's settings: the YAML schema, overrides, and the TRL trainer options it checks against."""
