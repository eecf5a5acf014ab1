"""Grouped convolutions: does searching whole-group moves (``Space.group_link``) help merge trained models?

Trains (cached) models with grouped convolutions on Fashion-MNIST with different seeds (``--limit``
training images seen ``--epochs`` times): by default a small ResNeXt-style CNN defined here
(:class:`TinyResNeXt`: three bottleneck blocks whose 3 x 3 convolutions have 8 groups of 8 channels),
which trains to a useful accuracy on 2 CPU cores; ``--arch regnet_x_400mf`` (or another torchvision
model) takes torchvision's (1-channel stem, 28 x 28 inputs). It merges every pair with activation
matching twice: with the graph ``merge_graph`` derives, whose grouped
convolutions' two spaces are linked and may move whole groups, and with the same graph unlinked
(groups kept in place, the behaviour before links). Also prints the share of links whose groups
activation matching moved, the mean correlation of the matched channels on the linked spaces with
each graph (how well the two searches align them), and CCA Merge with each graph (CCA aligns these
permutation-only spaces by activation matching as well). Accuracy is test accuracy (%); every figure
is mean +/- sd over the pairs.

    .venv/bin/python benchmarks/grouped_alignment.py
    .venv/bin/python benchmarks/grouped_alignment.py --arch regnet_x_400mf --limit 8192 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np
import torch

import ccatoolkit as cc
from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.data import get_loaders
from ccatoolkit.merging.align.permutation import group_sources
from ccatoolkit.merging.api import alignment_transforms, merge
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.zoo.cache import load_or_create
from ccatoolkit.zoo.trained import trained_model
from ccatoolkit.zoo.training import train


class TinyResNeXt(torch.nn.Module):
    """A ResNeXt-style CNN for 28 x 28 images: a stem, three bottleneck blocks (1x1, grouped 3x3, 1x1,
    residual; strides 1, 2, 2) and a linear head. Each grouped convolution makes two linked spaces."""

    def __init__(self, width: int = 64, groups: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        for stride in (1, 2, 2):
            block = nn.Module()
            block.a = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            block.b = nn.Sequential(nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU())
            block.c = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
            block.skip = (nn.Sequential(nn.Conv2d(width, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                          if stride > 1 else nn.Identity())
            block.relu = nn.ReLU()
            self.blocks.append(block)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block.relu(block.c(block.b(block.a(x))) + block.skip(x))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnext(seed: int, limit: int, epochs: int) -> torch.nn.Module:
    """A :class:`TinyResNeXt` trained on ``limit`` Fashion-MNIST training images (seed ``seed``), cached."""
    key = {"model": "TinyResNeXt(64, 8)", "dataset": "fashion_mnist", "limit": limit, "epochs": epochs, "seed": seed,
           "batch_size": 128}

    def create() -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = TinyResNeXt()
        loader = get_loaders("fashion_mnist", batch_size=128, limit=limit, seed=seed)["train"]
        train(model, loader, epochs=epochs, seed=seed, progress=False)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    model = TinyResNeXt()
    model.load_state_dict(load_or_create("benchmark-model", key, create))
    return model.eval()


def link_alignment(reference: torch.nn.Module, model: torch.nn.Module, linked: MergeGraph, unlinked: MergeGraph,
                   data: list) -> tuple[float, float, float]:
    """``(share of links whose groups moved, mean correlation of matched channels on the linked spaces with
    group moves, the same with groups kept in place)``: how much better the wider search aligns."""
    stats = collect_statistics([reference, model], data, {s.name: list(s.capture) for s in linked.spaces},
                               progress=False, warn=False)
    names = [n for members in linked.group_links.values() for n in members]
    corrs = {name: torch.nan_to_num(stats[name].corr(0, 1).cpu()) for name in names}
    moved, matched = 0, {True: [], False: []}
    for graph, may_move in ((linked, True), (unlinked, False)):
        perms = alignment_transforms(reference, model, "permute", data, graph=graph, progress=False)
        for name in names:
            space = graph.space(name)
            perm = perms[name][0].argmax(1)  # out = P with P[i, perm[i]] = 1
            matched[may_move].append(float(corrs[name][torch.arange(space.size), perm].mean()))
            if may_move and name == linked.group_links[space.group_link][0]:
                moved += int(not torch.equal(group_sources(perm, space.groups), torch.arange(space.groups)))
    return 100.0 * moved / max(len(linked.group_links), 1), float(np.mean(matched[True])), float(np.mean(matched[False]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny_resnext", help="tiny_resnext (defined here) or a torchvision model")
    p.add_argument("--models", type=int, default=3, help="models trained (seeds 0..models-1); every pair is merged")
    p.add_argument("--limit", type=int, default=16384, help="training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--merge-batches", type=int, default=16, help="training batches of 64 for the statistics")
    p.add_argument("--methods", nargs="+", default=["permute", "cca"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.arch == "tiny_resnext":
        models = [tiny_resnext(s, args.limit, args.epochs) for s in range(args.models)]
    else:
        models = [trained_model(model="torchvision", model_kwargs=dict(arch=args.arch), dataset="fashion_mnist",
                                limit=args.limit, epochs=args.epochs, batch_size=64, seed=s, progress=False)
                  for s in range(args.models)]
    loaders = get_loaders("fashion_mnist", batch_size=64, limit=max(args.limit, 2000))
    data = list(itertools.islice(loaders["train"], args.merge_batches))
    test = loaders["test"]
    acc = lambda m: 100.0 * float(cc.evaluate(m, test)["accuracy"])  # noqa: E731
    print(f"{args.arch}: models", " ".join(f"{acc(m):.1f}" for m in models), f"({time.time() - t0:.0f} s)")
    linked = merge_graph(models[0], example_input=data[0][0][:2])
    unlinked = MergeGraph([dataclasses.replace(s, group_link="") for s in linked.spaces])
    print(f"{len(linked.group_links)} group links over {sum(len(v) for v in linked.group_links.values())} spaces")
    rows: dict[str, list[float]] = {}
    for a, b in itertools.combinations(models, 2):
        rows.setdefault("ensemble", []).append(acc(merge([a, b], "ensemble")))
        moved, with_moves, in_place = link_alignment(a, b, linked, unlinked, data)
        rows.setdefault("links whose groups moved (%)", []).append(moved)
        rows.setdefault("matched channels' correlation, grouped spaces, groups may move", []).append(with_moves)
        rows.setdefault("matched channels' correlation, grouped spaces, groups kept in place", []).append(in_place)
        for method in args.methods:
            for label, graph in (("groups may move", linked), ("groups kept in place", unlinked)):
                merged = merge([a, b], method, data, graph=graph, progress=False)
                rows.setdefault(f"{method}, {label}", []).append(acc(merged))
        print({k: round(v[-1], 3) for k, v in rows.items()}, flush=True)
    print(f"\n{len(rows['ensemble'])} pairs, test accuracy (%), mean ± sd")
    print("| | value |\n|---|---|")
    for label, values in rows.items():
        digits = 3 if "correlation" in label else 1
        print(f"| {label} | {np.mean(values):.{digits}f} ± {np.std(values):.{digits}f} |")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
