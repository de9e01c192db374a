"""The engine runtime: KV block management today; scheduler, model runner, sampler and
EngineCore arrive with the engine-runtime issue."""
