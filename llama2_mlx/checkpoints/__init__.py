"""Checkpoint readers and converters: Meta folders, Hugging Face folders and hub ids into MLX model folders."""
