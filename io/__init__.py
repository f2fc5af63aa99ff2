"""kv_io: how bytes move — pinned staging buffers, KvikIO / POSIX file I/O, the on-disk block format and store,
and the private cache directory they live in.

Imported as `kv_io` (the folder is `io/`, whose top-level name the standard library owns).
"""

from kv_io.align import ALIGN, aligned_empty, is_aligned, round_up
from kv_io.disk_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    BlockHeader,
    CorruptBlockError,
    block_capacity,
    decode_header,
    encode_header,
    payload_checksum,
)
from kv_io.disk_store import (
    BlockWrite,
    DiskCapacityError,
    DiskLocation,
    DiskRecord,
    DiskStore,
    DiskWriteError,
    StoreLockedError,
)
from kv_io.file_io import (
    FileIO,
    KvikioFileIO,
    PosixFileIO,
    kvikio_available,
    make_file_io,
    probe_direct_io,
    read_direct,
    write_direct,
)
from kv_io.private_files import UnsafePathError
from kv_io.staging import StagingPool

__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "BlockHeader",
    "BlockWrite",
    "CorruptBlockError",
    "DiskCapacityError",
    "DiskLocation",
    "DiskRecord",
    "DiskStore",
    "DiskWriteError",
    "FileIO",
    "KvikioFileIO",
    "PosixFileIO",
    "StagingPool",
    "StoreLockedError",
    "UnsafePathError",
    "aligned_empty",
    "block_capacity",
    "decode_header",
    "encode_header",
    "is_aligned",
    "kvikio_available",
    "make_file_io",
    "payload_checksum",
    "probe_direct_io",
    "read_direct",
    "round_up",
    "write_direct",
]
