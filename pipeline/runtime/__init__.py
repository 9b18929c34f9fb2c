"""A stage's declaration (the stage contract), its own process, and its progress bars."""
