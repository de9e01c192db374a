"""Ways in: the offline LLM API (the HTTP/gRPC front arrives with the serving issue)."""
