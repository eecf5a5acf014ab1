"""What the notebooks run on: shared settings (smoke vs default sizes), widget contexts, their drawing and controls.

``settings`` sizes a run, ``inputs`` gives its loaders and zoo, ``contexts`` computes what widgets show,
``experiments`` runs the N-model merges (``store`` keeps merged accuracies on disk), ``render`` draws,
``controls`` wires ipywidgets, ``expectations`` checks the results each notebook promises.
"""
