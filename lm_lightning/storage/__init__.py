"""A run on disk: atomic checkpoints and their RNG state (``checkpoints.py``), a checkpoint checked and read before
anything runs (``loading.py``), where a run's files go (``folders.py``) and its settings checked before its folder
exists (``preflight.py``)."""
