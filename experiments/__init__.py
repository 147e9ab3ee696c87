"""Experiment tooling: the reproduction, its statistics, run records, tables and figures, and the speed tools.
Everything here writes into results/ and reads the run folders; train.py is run as a script, never imported (graph_probe runs it in-process with runpy, to plant bugs)."""
