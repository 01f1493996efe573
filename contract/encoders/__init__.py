"""Frozen encoders of `prx-data encode`: the VAE, the text encoder, the REPA teacher, and crop buckets."""
