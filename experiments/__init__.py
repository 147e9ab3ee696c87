"""Experiment tooling: the reproduction, its statistics, run records, tables and figures, and the speed tools.
Everything here writes into results/ and reads the run folders; nothing imports train.py (it is run as a process)."""
