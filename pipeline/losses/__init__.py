"""The token-level SFT losses: parameters (params), per-token statistics (stats), the chunked
projection (chunked), the losses (functions) and the loss the trainer calls (token_loss)."""
