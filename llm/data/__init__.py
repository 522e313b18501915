"""Data: tokenizers, Arrow shards with a manifest, the streaming reader, collators."""
