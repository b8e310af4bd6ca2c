"""Storage backends: where the archive's objects live.

Every backend offers the same few verbs on objects named by relative paths
such as ``chunks/ab/ab12…`` (doc/FORMAT.md lists them):

- ``write(name, parts, durable=False)``: create or replace the object
  atomically (a reader sees the old object or the whole new one, never a
  part); ``durable`` makes it survive a power loss before returning.
- ``create_exclusive(name, data)``: create only if absent, atomically with
  its content (a reader sees no object or all of it); False if present.
- ``read(name)`` (whole object, bytes) and ``open(name)`` (a file-like
  object with ``read(n)`` and ``close()``); both raise FileNotFoundError.
- ``size(name)`` (None if absent), ``list(prefix, recursive=True)`` (names
  under a folder, streamed, in no order), ``delete(name)`` (absent is fine).
- ``sync()``: every earlier ``write`` is durable when it returns.
- ``free_bytes()``: space left, or None if the backend cannot tell.

The archive logic above never knows which backend it talks to.
"""
from .local import LocalStore


def open_store(location):
    return LocalStore(location)
