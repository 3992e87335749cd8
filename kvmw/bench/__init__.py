"""Benchmarks behind `kvmw bench <name>`: baseline and kvmw side by side, ratios printed, JSON written."""
