"""Benchmarks and the load-test harness (`moeserve bench serve`), importable as `moeserve.bench`."""
