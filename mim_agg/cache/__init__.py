"""The token cache: extract a frozen backbone's tokens once, probe from them many times.

``build.open_cache`` finds (or extracts) the cache a run needs, ``store`` holds its format,
``extract`` writes it, ``parts`` deals its shards to the processes that write them (DDP ranks,
``cache.part``), ``data`` reads it as loaders and a ``TokenSource``.
"""

from mim_agg.cache.build import open_cache
from mim_agg.cache.data import CachedDataModule, CachedTokens
from mim_agg.cache.store import CacheError, TokenCache

__all__ = ["CacheError", "CachedDataModule", "CachedTokens", "TokenCache", "open_cache"]
