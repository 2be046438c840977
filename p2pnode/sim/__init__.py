"""A local multi-node simulation: scenarios, runners (in-process, processes), reports.

Entry point: ``scripts/simulate.py``. Pure parts (``scenario``, ``stats``,
``report``) have no I/O; ``engine`` schedules a scenario against a cluster of
``inprocess`` or ``processes`` nodes and measures it.
"""
