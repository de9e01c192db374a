"""Test support: tiny Hub-layout checkpoints, the equality rule, the transformers oracle, and a
minimal runner over the paged cache. `checkpoints` and `oracle` need transformers ([dev])."""
