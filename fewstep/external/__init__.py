"""Readers of models written by other projects."""
