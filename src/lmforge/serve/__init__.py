"""OpenAI-compatible HTTP serving of an ``LLMEngine``: FastAPI app, SSE streaming, metrics, chat page."""
