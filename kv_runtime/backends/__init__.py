"""kv_runtime/backends."""
