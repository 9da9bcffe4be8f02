"""Decoding (batched beam search) and scoring (sacrebleu BLEU/chrF per direction)."""
