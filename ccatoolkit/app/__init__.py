"""What the notebooks run on: shared settings (smoke vs default sizes), widget contexts, their drawing and controls.

``settings`` sizes a run, ``contexts`` computes what widgets show, ``render`` draws it, ``controls`` wires ipywidgets.
"""
