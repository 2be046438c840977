"""Reaching nodes behind NATs and firewalls (issue 12).

- ``reachability``: what this node knows of its own reachability (the verdict
  the other parts act on) and the addresses peers observed for it;
- ``autonat``: dial-back probes that confirm it;
- ``portmap``: UPnP-IGD and PCP/NAT-PMP port mappings on the home router;
- ``relay``: a limited circuit relay on public nodes, and reservations on them;
- ``holepunch``: direct connection upgrade through a relayed one (DCUtR-style).
"""
