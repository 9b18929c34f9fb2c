"""Training with TRL: SFT with the token losses, DPO, the reference model's cached top-K, preference pairs."""
