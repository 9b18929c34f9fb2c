"""What a person reads: the comparison report, its plots, and the command line's tables."""
