"""Offline data tools: the command lines that train a tokenizer and write datasets (text shards,
the synthetic corpus), over md4_dist.data (see the README)."""
