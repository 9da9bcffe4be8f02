"""The one model: Transformer pieces, the MoE FFN, the encoder-decoder."""
