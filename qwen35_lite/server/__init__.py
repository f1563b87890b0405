"""`qwen35-lite serve`: an OpenAI-compatible HTTP server over one loaded Engine (FastAPI + uvicorn), with the kept model states of recent requests."""
