"""Ways in: the offline LLM API, the OpenAI-compatible HTTP front, the gRPC front."""
