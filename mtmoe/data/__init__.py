"""Corpus files -> vocabulary -> token ids -> sampled token-budget batches."""
