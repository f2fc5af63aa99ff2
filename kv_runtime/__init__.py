"""kv_runtime."""
