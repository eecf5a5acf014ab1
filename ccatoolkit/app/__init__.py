"""What the notebooks run on: shared settings (smoke vs default sizes), widget contexts, their drawing and controls.

``settings`` sizes a run, ``inputs`` gives its loaders and zoo, ``contexts`` computes what widgets show,
``experiments`` runs the N-model merges (``store`` keeps merged accuracies on disk), ``render`` draws,
``controls`` wires ipywidgets, ``expectations`` checks the results each notebook promises. The lessons'
worked steps live beside them: ``by_hand`` (notebook 3: CCA Merge step by step), ``toys`` (notebook 4: the
barrier by hand, why a CCA-aligned model is not B, a many-to-one neuron), ``inside`` (notebook 2).
"""
