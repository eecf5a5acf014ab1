"""Do the zoo's models reach the accuracies the merging experiments assume? (run by hand, not a test)

Trains, from scratch and without the cache, the MLP (depth 3, width 512) and a CNN (ResNet20 or
VGG11, width 1) on Fashion-MNIST with the package's default recipe (SGD + Nesterov momentum,
one-cycle schedule, weight decay 5e-4, 10% of the training set held out) and prints a table of
test accuracy, epochs, wall seconds and device. Targets: MLP >= 88%, ResNet20/VGG11 width 1 >= 91%.

    python benchmarks/quality.py                           # both, default epochs
    python benchmarks/quality.py --models mlp --epochs-mlp 10
    python benchmarks/quality.py --models resnet20 --limit 512 --epochs-cnn 1   # smoke run of the CNN path

The CNN part is slow on a CPU (minutes per epoch); run it on a GPU for the real numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from ccatoolkit.data.datasets import dataset_info
from ccatoolkit.data.loaders import get_loaders
from ccatoolkit._utils import resolve_device
from ccatoolkit.zoo.models import build_model
from ccatoolkit.zoo.training import default_lr, evaluate, train

TARGETS = {"mlp": 0.88, "resnet20": 0.91, "vgg11": 0.91}
MODEL_KWARGS = {"mlp": dict(depth=3, width=512), "resnet20": dict(width=1), "vgg11": dict(width=1.0)}


def run_one(name: str, epochs: int, args: argparse.Namespace) -> dict[str, object]:
    device = resolve_device(args.device)
    info = dataset_info(args.dataset)
    loaders = get_loaders(args.dataset, batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                          root=args.root, download=not args.no_download, device=device)
    torch.manual_seed(args.seed)
    model = build_model(name, in_shape=info["in_shape"], num_classes=info["num_classes"], **MODEL_KWARGS[name])
    lr = args.lr if args.lr is not None else default_lr(model)
    start = time.perf_counter()
    train(model, loaders["train"], epochs, lr=lr, seed=args.seed, device=device, progress=args.progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    test = evaluate(model, loaders["test"])
    return dict(model=name, epochs=epochs, lr=lr, n_train=len(loaders["train"].dataset), accuracy=test["accuracy"],
                target=TARGETS[name], seconds=seconds, device=str(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet20", help="comma-separated: mlp, resnet20, vgg11")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--epochs-mlp", type=int, default=10)
    parser.add_argument("--epochs-cnn", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="cap train/val/test sizes (smoke runs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--root", default=None, help="folder with the data files")
    parser.add_argument("--no-download", action="store_true")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in [m.strip().lower() for m in args.models.split(",") if m.strip()]:
        if name not in TARGETS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(TARGETS)}")
        epochs = args.epochs_mlp if name == "mlp" else args.epochs_cnn
        rows.append(run_one(name, epochs, args))
        r = rows[-1]
        print(f"  {name}: {r['accuracy']:.4f} in {r['seconds']:.1f}s", flush=True)

    limited = f" (limit={args.limit}: smoke run, targets do not apply)" if args.limit else ""
    print(f"\n{args.dataset}, batch {args.batch_size}, seed {args.seed}, torch threads {torch.get_num_threads()}{limited}")
    header = f"{'model':<10}{'epochs':>7}{'lr':>7}{'n_train':>9}{'test acc':>10}{'target':>8}{'ok':>5}{'wall s':>9}  device"
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = "yes" if r["accuracy"] >= r["target"] else "no"
        print(f"{r['model']:<10}{r['epochs']:>7}{r['lr']:>7.3g}{r['n_train']:>9}{r['accuracy']:>10.4f}"
              f"{r['target']:>8.2f}{ok:>5}{r['seconds']:>9.1f}  {r['device']}")


if __name__ == "__main__":
    main()
