"""Offline data tools: tokenizer training and WebDataset sharding (see the README)."""
