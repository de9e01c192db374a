"""The engine runtime: requests, scheduler, KV block manager, model runner, sampler,
detokenizer, LLMEngine and the EngineCore loop."""
