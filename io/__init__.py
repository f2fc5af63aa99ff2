"""kv_io: how bytes move — pinned staging buffers, KvikIO / POSIX file I/O, the on-disk block format and store.

Imported as `kv_io` (the folder is `io/`, whose top-level name the standard library owns).
"""
