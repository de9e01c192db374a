"""The worker side of an engine: one Worker per device holds the model, its KV cache and the
model runner, and answers the executor's calls."""
