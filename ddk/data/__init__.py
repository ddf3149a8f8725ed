"""Corpus -> packed per-domain token shards (prepare) and batches from them (dataset)."""
