"""Token caches: class, register and patch tokens of every tile, fp16 in HDF5."""

from jwth.cache.tokens import CacheDamagedError, CacheMismatchError, TokenCache, manifest_for

__all__ = ["CacheDamagedError", "CacheMismatchError", "TokenCache", "manifest_for"]
