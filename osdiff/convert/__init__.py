"""Converters from other projects' checkpoints to osdiff model folders."""
