"""Running model-written code: the bubblewrap sandbox and the test harness that runs inside it."""
