"""kv_policy."""
