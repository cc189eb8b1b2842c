"""Memory, measured and planned: the ground-floor measuring helpers (``measure.py``), the memory monitor of a fit
(``monitor.py``: ``--trainer.callbacks+=MemoryMonitor``) and ``estimate`` (``estimate.py``, with its probe in
``probe.py``), which predicts a fit's peak before it runs. Nothing is imported here, so that the measuring helpers stay
importable from anywhere without loading the rest."""
