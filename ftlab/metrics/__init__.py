"""Measurements: generation scores (exact match, answer F1, BLEU, ROUGE-L) and peak memory."""
