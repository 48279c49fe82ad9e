"""The decode instance: preallocates KV pages per request, receives them from prefill, then decodes."""
