"""Constants shared by the kv_io tests, in a module of its own: every test folder has a `conftest`, so
importing names from `conftest` would pick up whichever folder's was loaded first."""

from __future__ import annotations

SLAB_BYTES = 256 * 1024
NUM_SLABS = 2
