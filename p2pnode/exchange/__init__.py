"""Content-addressed resources: manifests and ids (``manifest``), the exchange's
wire messages and bitfield codec (``messages``), piece picking (``picker``), what
a download does after each request (``policy``), the SQLite/file store
(``store``), the piece server (``server``), the multi-source fetcher
(``fetcher``) and the facade node.py uses (``service``).

Kept import-free on purpose: ``p2pnode.config`` imports ``exchange.config``.
"""
