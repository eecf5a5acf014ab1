"""Saved merges that pin ``merge``, ``align_to``, ``alignment_transforms`` and ``RidgeSweep`` down to the bit.

A refactoring of :mod:`ccatoolkit.merging` must leave every merged weight as it was. This module
builds a fixed set of small models (trained a little on scikit-learn digits, or given BatchNorm
statistics on random images), runs every public merging call on them with the options that take
different code paths, and compares the results with ``tests/data/golden_merges.pt``. The input
models are stored in that file too, so the comparison does not depend on the training code.

Add new cases with ``--add``; regenerate everything only when a change of results is intended, and say
why in the commit::

    PYTHONPATH=. python tests/golden_merges.py --add      # or --write, or --update CASE ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

GOLDEN = Path(__file__).with_name("data") / "golden_merges.pt"


def _data() -> dict[str, list[Any]]:
    """The cases' data: digits batches of 128 and random 3-channel 8x8 images."""
    from toybox import digit_batches

    images = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    return {"digits": digit_batches(128)[0], "images": images}


def _models(data: dict[str, list[Any]]) -> dict[str, list[nn.Module]]:
    """The model families the cases run on (only made when the saved outputs are written)."""
    from toybox import ConvBN, SmallRes, TinyResNeXt, digit_mlps, fit

    from ccatoolkit.merging.normalization import reset_bn_stats

    train, images = data["digits"], data["images"]
    families: dict[str, list[nn.Module]] = {"mlp": list(digit_mlps(train, seeds=(0, 1, 2), width=16))}
    convbn = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        convbn.append(fit(ConvBN(width=6), train, epochs=2, seed=seed))
    families["convbn"] = convbn
    smallres = []
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        smallres.append(fit(SmallRes(), [(x, y % 3) for x, y in train], epochs=2, seed=seed))
    families["smallres"] = smallres
    grouped = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        model = TinyResNeXt()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
        grouped.append(reset_bn_stats(model, images, progress=False).eval())
    families["grouped"] = grouped
    return families


def _builders() -> dict[str, Callable[[], nn.Module]]:
    """How to build each family's architecture (the weights come from the saved file)."""
    from toybox import ConvBN, SmallRes, TinyResNeXt

    from ccatoolkit.zoo.models import MLP

    return {"mlp": lambda: MLP(depth=2, width=16, in_shape=(1, 8, 8)), "convbn": lambda: ConvBN(width=6),
            "smallres": SmallRes, "grouped": TinyResNeXt}


def _load(states: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, list[nn.Module]]:
    builders = _builders()
    families = {}
    for name, family in states.items():
        families[name] = []
        for state in family:
            model = builders[name]()
            model.load_state_dict(state)
            families[name].append(model.eval())
    return families


def _cases() -> dict[str, Callable[[dict[str, list[nn.Module]], dict[str, list[Any]]], Any]]:
    """Name -> call producing a model or a transforms dict; each takes a different path through merging/."""
    from ccatoolkit.merging.api import RidgeSweep, align_to, alignment_transforms, merge

    D, I = "digits", "images"  # noqa: E741 - the two data sets' keys
    quiet = dict(progress=False)
    cases: dict[str, Callable[..., Any]] = {}
    for method in ("average", "permute", "permute_weight", "c2m3", "zipit", "cca", "cca_multiview"):
        cases[f"mlp/{method}"] = lambda f, d, m=method: merge(f["mlp"][:2], m, d[D], **quiet)
        cases[f"convbn/{method}"] = lambda f, d, m=method: merge(f["convbn"], m, d[D], **quiet)
        cases[f"smallres3/{method}"] = lambda f, d, m=method: merge(f["smallres"], m, d[D], **quiet)
    for method in ("permute", "cca", "zipit", "cca_multiview", "permute_weight"):
        cases[f"grouped/{method}"] = lambda f, d, m=method: merge(f["grouped"], m, d[I], **quiet)
    cases.update({
        "mlp3/cca": lambda f, d: merge(f["mlp"], "cca", d[D], **quiet),
        "mlp3/zipit_no_within": lambda f, d: merge(f["mlp"], "zipit", d[D], allow_within_model=False, **quiet),
        "mlp/cca_val": lambda f, d: merge(f["mlp"][:2], "cca", d[D][:6], val_data=d[D][6:], **quiet),
        "mlp/cca_rule_correlation": lambda f, d: merge(f["mlp"][:2], "cca", d[D], ridge_rule="correlation", **quiet),
        "mlp/cca_ridge_0.5": lambda f, d: merge(f["mlp"][:2], "cca", d[D], ridge=0.5, **quiet),
        "mlp/cca_no_repair": lambda f, d: merge(f["mlp"][:2], "cca", d[D], ridge=1.0, repair=False, **quiet),
        "mlp/cca_few_batches": lambda f, d: merge(f["mlp"][:2], "cca", d[D][:3], **quiet),
        "mlp/cca_max_batches": lambda f, d: merge(f["mlp"][:2], "cca", d[D], max_batches=5, **quiet),
        "mlp/cca_grid": lambda f, d: merge(f["mlp"][:2], "cca", d[D], ridge_grid=(0.05, 3.0), **quiet),
        "mlp/permute_ref1": lambda f, d: merge(f["mlp"][:2], "permute", d[D], reference=1, **quiet),
        "mlp/permute_best": lambda f, d: merge(f["mlp"], "permute", d[D], reference="best", val_data=d[D][6:],
                                               **quiet),
        "mlp/repair_passes": lambda f, d: merge(f["mlp"][:2], "zipit", d[D], repair_passes=1, **quiet),
        "mlp/permute_weight_seed": lambda f, d: merge(f["mlp"][:2], "permute_weight", d[D], seed=3, max_iter=5,
                                                      **quiet),
        "convbn/average_repair": lambda f, d: merge(f["convbn"], "average", d[D], repair=True, **quiet),
        "convbn/permute_repair": lambda f, d: merge(f["convbn"], "permute", d[D], repair=True, **quiet),
        "convbn/permute_no_reset": lambda f, d: merge(f["convbn"], "permute", d[D], reset_bn=False, **quiet),
        "convbn/cca_no_reset": lambda f, d: merge(f["convbn"], "cca", d[D], ridge=1.0, reset_bn=False, **quiet),
        "convbn/cca_repair_only": lambda f, d: merge(f["convbn"], "cca", d[D], ridge=1.0, repair=True,
                                                     reset_bn=False, **quiet),
        "convbn/cca_ref1_passes": lambda f, d: merge(f["convbn"], "cca", d[D], reference=1, repair_passes=2,
                                                     **quiet),
        "mlp/align_cca": lambda f, d: align_to(*f["mlp"][:2], "cca", d[D], repair=False, **quiet),
        "mlp/align_cca_repaired": lambda f, d: align_to(*f["mlp"][:2], "cca", d[D], **quiet),
        "mlp/align_permute": lambda f, d: align_to(*f["mlp"][:2], "permute", d[D], **quiet),
        "convbn/align_cca_reset": lambda f, d: align_to(*f["convbn"], "cca", d[D], reset_bn=True, repair=False,
                                                    **quiet),
        "convbn/align_cca_repaired": lambda f, d: align_to(*f["convbn"], "cca", d[D], **quiet),
        "convbn/align_permute_reset": lambda f, d: align_to(*f["convbn"], "permute", d[D], reset_bn=True, **quiet),
        "convbn/align_weight": lambda f, d: align_to(*f["convbn"], "permute_weight", **quiet),
        "smallres/transforms_cca": lambda f, d: alignment_transforms(*f["smallres"][:2], "cca", d[D], ridge=0.3,
                                                                     **quiet),
        "smallres/transforms_multiview": lambda f, d: alignment_transforms(*f["smallres"][:2], "cca_multiview",
                                                                           d[D], **quiet),
        "smallres/transforms_average": lambda f, d: alignment_transforms(*f["smallres"][:2], "average", **quiet),
        "mlp/sweep": lambda f, d: _sweep(RidgeSweep(f["mlp"], "cca", d[D]), (0.1, 1.0)),
        "convbn/sweep_multiview": lambda f, d: _sweep(RidgeSweep(f["convbn"], "cca_multiview", d[D]), (0.3,)),
    })
    return cases


def _sweep(sweep: Any, ridges: tuple[float, ...]) -> dict[str, Any]:
    return {f"ridge={r}": sweep(r) for r in ridges}


def _record(result: Any) -> Any:
    """What is compared of a result: a model's state and ``merge_info`` (without timings), or tensors."""
    if isinstance(result, nn.Module):
        info = {k: v for k, v in getattr(result, "merge_info", {}).items() if k != "seconds"}
        return {"state": {k: v.detach().clone() for k, v in result.state_dict().items()}, "info": repr(info)}
    if isinstance(result, dict):
        return {k: _record(v) for k, v in result.items()}
    if isinstance(result, tuple):
        return tuple(_record(v) for v in result)
    if isinstance(result, torch.Tensor):
        return result.detach().clone()
    raise TypeError(f"cannot record a {type(result).__name__}")


def machine() -> str:
    """Torch version and CPU kernel set: bitwise equality is only promised where both match."""
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"


def compute(names: list[str] | None = None) -> dict[str, Any]:
    """The records of the named cases (all by default), computed from the stored input models."""
    families = _load(torch.load(GOLDEN, weights_only=False)["models"])
    data, cases = _data(), _cases()
    return {name: _record(cases[name](families, data)) for name in (names or list(cases))}


def differences(expected: Any, actual: Any, path: str = "") -> list[tuple[str, float]]:
    """``(where, max abs difference)`` for every tensor that differs (inf where shapes or text differ)."""
    if isinstance(expected, dict):
        if set(expected) != set(actual):
            return [(f"{path} keys", float("inf"))]
        return [d for k in expected for d in differences(expected[k], actual[k], f"{path}/{k}")]
    if isinstance(expected, tuple):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}/{i}")]
    if isinstance(expected, torch.Tensor):
        if expected.shape != actual.shape or expected.dtype != actual.dtype:
            return [(path, float("inf"))]
        if torch.equal(expected, actual):
            return []
        return [(path, float((expected.double() - actual.double()).abs().max()))]
    return [] if expected == actual else [(f"{path} = {actual!r} (saved {expected!r})", float("inf"))]


def write() -> None:
    torch.set_num_threads(1)
    data = _data()
    states = {name: [m.state_dict() for m in family] for name, family in _models(data).items()}
    families, cases = _load(states), _cases()  # built as the test builds them
    records = {name: _record(call(families, data)) for name, call in cases.items()}
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({"machine": machine(), "models": states, "records": records}, GOLDEN)
    print(f"wrote {len(records)} cases to {GOLDEN} ({GOLDEN.stat().st_size / 1e6:.2f} MB) on {machine()}")


def add_new_cases() -> None:
    """Save the cases that are not in the file yet, leaving every saved one as it is."""
    torch.set_num_threads(1)
    saved = torch.load(GOLDEN, weights_only=False)
    new = [name for name in _cases() if name not in saved["records"]]
    saved["records"].update(compute(new))
    torch.save(saved, GOLDEN)
    print(f"added {len(new)} cases: {', '.join(new)}")


def update_cases(names: list[str]) -> None:
    """Compute the named cases again on the saved models and save them (an intended change of their results)."""
    torch.set_num_threads(1)
    saved = torch.load(GOLDEN, weights_only=False)
    unknown = sorted(set(names) - set(_cases()))
    if unknown:
        raise SystemExit(f"no such case(s): {', '.join(unknown)}")
    saved["records"].update(compute(names))
    torch.save(saved, GOLDEN)
    print(f"updated {len(names)} cases: {', '.join(names)}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="compute every case and save them (new models too)")
    parser.add_argument("--add", action="store_true", help="compute and save only the cases not saved yet")
    parser.add_argument("--update", nargs="+", metavar="CASE", help="compute these saved cases again (models kept)")
    args = parser.parse_args()
    if args.update:
        update_cases(args.update)
    elif args.write:
        write()
    elif args.add:
        add_new_cases()
