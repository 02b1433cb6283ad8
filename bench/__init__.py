"""Benchmarks: corral side by side with its peers (`make bench`; never part of `make test`)."""
