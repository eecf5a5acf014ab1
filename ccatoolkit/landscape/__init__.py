"""Loss landscapes between networks: batched evaluation of weight-space points, paths, planes, learned curves.

``points`` evaluates many mixtures of models at once, ``paths`` builds lines/planes/simplices, ``curves`` holds
the Bezier / polygonal-chain curves and ``curve_training`` learns them, ``compare`` sets lines against curves for
each alignment, ``pam`` learns a curve and B's permutation together (PAM), ``results`` holds what they return.
"""

from ccatoolkit.landscape.compare import compare_paths
from ccatoolkit.landscape.curve_training import train_curve
from ccatoolkit.landscape.curves import Curve, CurveResult
from ccatoolkit.landscape.pam import PamResult, train_curve_pam
from ccatoolkit.landscape.paths import interpolate, loss_plane, simplex
from ccatoolkit.landscape.points import evaluate_points, interpolated_model
from ccatoolkit.landscape.results import InterpolationResult, PlaneResult, SimplexResult, barrier

__all__ = [
    "Curve", "CurveResult", "compare_paths", "train_curve", "interpolate", "loss_plane", "simplex",
    "evaluate_points", "interpolated_model", "InterpolationResult", "PlaneResult", "SimplexResult", "barrier",
    "PamResult", "train_curve_pam",
]
