"""The prefill instance: runs prompts, then pushes their KV pages and first token to the decode peer."""
