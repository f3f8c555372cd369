"""Token caches: class, register and patch tokens of every tile, fp16 in HDF5."""

from jwth.cache.tokens import CacheMismatchError, TokenCache, manifest_for

__all__ = ["CacheMismatchError", "TokenCache", "manifest_for"]
