"""A local multi-node simulation: scenarios, runners (in-process, processes,
virtual), reports.

Entry point: ``scripts/simulate.py``. Pure parts (``scenario``, ``stats``,
``report``) have no I/O; ``engine`` schedules a scenario against a cluster of
``inprocess``, ``processes`` or ``virtual`` nodes and measures it. Virtual mode
runs the real DHT and peer connections over ``vnet`` (an in-memory network)
under ``vloop`` (an event loop in virtual time). ``lookupnet`` is smaller: routing
tables in memory for the lookup engine alone (its tests and benchmark).
"""
