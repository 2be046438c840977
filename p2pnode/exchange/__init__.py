"""Content-addressed resources: manifests and ids (``manifest``), piece picking
(``picker``), the SQLite/file store (``store``), the piece server (``server``),
the multi-source fetcher (``fetcher``) and the facade node.py uses (``service``).

Kept import-free on purpose: ``p2pnode.config`` imports ``exchange.config``.
"""
