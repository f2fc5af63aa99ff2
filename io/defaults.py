"""kv_io's tunable defaults, in a module that imports nothing, so that configuration code can read them without
loading torch (``kv_runtime.config`` reads ``DEFAULT_THREADS`` as the default of ``io_threads``)."""

from __future__ import annotations

DEFAULT_THREADS = 16
"""Outstanding requests. The threads spend their time blocked in the kernel, so more of them than cores is cheap;
on the 16-core GPU machine's virtio disk 8 threads of 4 MiB requests reached 0.86-0.89 of one raw O_DIRECT
write, 16 threads of 16 MiB requests 1.0 (io/README.md)."""
DEFAULT_CHUNK_BYTES = 16 << 20
"""Request size: larger transfers are split into requests of this size, issued concurrently, and the disk store
merges file-adjacent blocks up to it (four 3.5 MiB blocks of a 7B model's KV per request)."""
