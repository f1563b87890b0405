"""Text in and out: the tokenizer, the chat template and its sandbox, Qwen3.5's tool-call markup."""
