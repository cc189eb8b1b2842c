"""What a person reads about runs: the HPARAMS row of a run (``hparams.py``) and ``compare``, runs side by side with
the Pareto picture (``compare.py``)."""
