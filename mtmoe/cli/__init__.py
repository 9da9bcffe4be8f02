"""Thin Hydra entry points. Each turns config into a call of the library and bad input into one
clear line on stderr (exit code 2)."""
