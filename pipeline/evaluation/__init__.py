"""Scoring: verifiers, Pass@K and its statistics, answer-token entropy, and lm-eval suites."""
