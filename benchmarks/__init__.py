"""Benchmarks: accuracy against the models a user would pick instead, and the DCG prior-fit diagnosis (README.md)."""
