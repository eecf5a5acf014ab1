"""Plots that draw into a given matplotlib axis, so notebooks and widgets can redraw them.

``plots.landscape``: interpolation curves, barrier bars, 2-D planes, curves along t.
``plots.analysis``: correlation heatmaps, canonical-correlation spectra, accuracy bars and N-model lines.
``plots.style``: one colour per method across the notebooks, percentage-point labels.
"""
