"""CDAE retrieval on MNIST: train unsupervised, embed, rank, score (the issue's protocol).

Protocol (fixed): embed the 10,000 test images with the CDAE encoder (L2-normalised codes),
rank the 60,000 train images by cosine for each test query; same label = relevant; report
P@10, mAP@10 and mAP@all. Labels are read for scoring only, never for training.

    python benchmarks/cdae_mnist.py --preset default                      # full protocol
    python benchmarks/cdae_mnist.py --preset tutorial --epochs 20
    python benchmarks/cdae_mnist.py --preset default --epochs 3 --queries 2000 \\
        --set rotate_degrees=0 --name no-rotation                         # an ablation
    python benchmarks/cdae_mnist.py ... --whiten-grid none:0 64:0.1       # + whitened rows

MNIST is read from the shared IDX .gz files (never copied into the repo).

The ablation below chose what is now the ``strokes`` preset (the handwriting invariances; it was
cbir's default until the generalisation suite, ``cbir bench quality``, docs/quality.md, chose a
default for any collection). Its "default" rows are today's ``--preset strokes``.

Ablation (seed 0, 1 torch thread on a shared 2-core machine, so s/epoch is noisy; "*" with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set, which removes ~35% page-fault time).
Screening: 3 epochs, first 2,000 test queries. Each row adds to the one above unless noted.

    variant              change                                    s/ep  P@10   mAP@10 mAP@all
    tutorial             adadelta, noise 0.5, 4x4x8 ReLU code      30.5  0.903  0.878  0.425
    tutorial-adam        adam 2e-3, cosine lr                      15.6  0.886  0.858  0.426
    affine               + rotate 15, shift 2 px, scale 0.1        15.0  0.849  0.810  0.367
    +elastic+erase       + elastic 1 px, erase p=0.3, noise 0.3    23.7  0.863  0.827  0.366
    +cosine consistency  + 2 views, 1 - cos(z1, z2), weight 1      50.7  0.889  0.861  0.410
    +nt-xent             + 2 views, NT-Xent t=0.1, weight 1        49.2  0.928  0.911  0.593
    +linear-128          + linear 128-d code                       55.9  0.956  0.944  0.660
      linear-64          64-d code instead                         52.5  0.952  0.941  0.662
      t=0.2              temperature 0.2                           54.7  0.943  0.929  0.683
      t=0.05             temperature 0.05                          63.9  0.956  0.945  0.639
      weight 0.3         consistency weight 0.3                    50.3  0.957  0.945  0.664
      batch norm         BN after every conv                       57.4  0.953  0.941  0.668
      stronger aug       rotate 20, shift 3, scale 0.15, elastic 1.5 56.8 0.949  0.935  0.679
      batch 256          256 images (512 views) per step           50.4  0.952  0.940  0.651
      32-32-16           wider encoder and decoder                145.2  0.968  0.960  0.682
      16-32-32                                                     84.6  0.969  0.961  0.670
    16-16-16 (default)   every stage 16 channels                   76.0  0.965  0.955  0.689
      noise 0.1                                                    35.4* 0.963  0.951  0.634
      lr 4e-3                                                      37.5* 0.963  0.953  0.680
      weight 2                                                     46.2* 0.962  0.952  0.683

PCA-whitening the codes (fitted on the train codes, --whiten-grid) lowered mAP@all in every
variant (e.g. 0.660 -> 0.594 for linear-128 with shrinkage 1; 0.425 -> 0.283 for the
tutorial without shrinkage), so the default does not whiten.

Full protocol (10,000 queries):

    preset     epochs seed  s/ep   P@10    mAP@10  mAP@all
    default    10     0     61.0   0.9769  0.9708  0.7080   (403 s CPU for the whole run)
    default    10     1     43.6   0.9759  0.9694  0.6916
    tutorial   20     0     18.3   0.9437  0.9285  0.4578
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, embed_arrays, parse_overrides  # noqa: E402
from index.metrics import evaluate_retrieval  # noqa: E402
from models import registry  # noqa: E402
from models.cdae import (  # noqa: E402
    CDAEConfig,
    apply_whitening,
    encode_images,
    fit_whitening,
    save_checkpoint,
    train_cdae,
)

DEFAULT_DATA = Path("/work/shared/datasets/mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array: images (n, 28, 28) or labels (n,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # type byte 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_mnist(root: Path) -> dict[str, np.ndarray]:
    return {
        "train_images": read_idx(root / "train-images-idx3-ubyte.gz"),
        "train_labels": read_idx(root / "train-labels-idx1-ubyte.gz"),
        "test_images": read_idx(root / "t10k-images-idx3-ubyte.gz"),
        "test_labels": read_idx(root / "t10k-labels-idx1-ubyte.gz"),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], presets=["tutorial", "default", "strokes"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--whiten-grid",
        nargs="*",
        default=[],
        metavar="DIMS:SHRINK",
        help="also score the same model PCA-whitened, e.g. none:0 64:0.1",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mnist = load_mnist(args.data)
    config = CDAEConfig.from_dict(
        {**CDAEConfig.preset(args.preset).to_dict(), **parse_overrides(args.overrides)}
    )
    epochs = args.epochs if args.epochs is not None else config.epochs
    name = args.name or args.preset

    def report(epoch: int, step: int, steps: int, loss: float) -> None:
        if step == steps:
            print(f"  epoch {epoch}/{epochs} loss {loss:.4f}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = train_cdae(
        mnist["train_images"],
        config=config,
        epochs=epochs,
        device=torch.device("cpu"),
        seed=args.seed,
        progress=report,
    )
    train_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = args.save or Path(tmp) / "cdae.pt"
        sha = save_checkpoint(
            path,
            result=result,
            config=config,
            dataset={"name": "mnist", "split": "train", "images": len(mnist["train_images"])},
        )
        embedder = registry.create("cdae", checkpoint=path)
        started = time.perf_counter()
        db = embed_arrays(embedder, mnist["train_images"])
        queries = embed_arrays(embedder, mnist["test_images"][: args.queries])
        embed_s = time.perf_counter() - started

    def score(db_vectors: np.ndarray, query_vectors: np.ndarray) -> dict[str, float | int]:
        return evaluate_retrieval(
            query_vectors=query_vectors,
            query_labels=mnist["test_labels"][: args.queries],
            db_vectors=db_vectors,
            db_labels=mnist["train_labels"],
        )

    started = time.perf_counter()
    rows = [{"name": name, "whitening": "ckpt" if config.whiten else "none", **score(db, queries)}]
    eval_s = time.perf_counter() - started
    model = result.model
    train_t = torch.from_numpy(mnist["train_images"])
    test_t = torch.from_numpy(mnist["test_images"][: args.queries])
    for spec in args.whiten_grid:
        dims, _, shrink = spec.partition(":")
        wconfig = CDAEConfig.from_dict(
            {
                **config.to_dict(),
                "whiten_dims": None if dims == "none" else int(dims),
                "whiten_shrinkage": float(shrink or 0),
            }
        )
        whitening = fit_whitening(model, train_t, config=wconfig)

        def white(images: torch.Tensor, whitening=whitening, wconfig=wconfig) -> np.ndarray:
            codes = apply_whitening(encode_images(model, images, config=wconfig), whitening)
            return torch.nn.functional.normalize(codes, dim=1).numpy()

        rows.append({"name": name, "whitening": spec, **score(white(train_t), white(test_t))})

    seconds_per_epoch = float(np.mean(result.epoch_seconds))
    print(
        f"\n{'variant':<24} {'white':<9} {'ep':>3} {'s/ep':>6} {'P@10':>7} {'mAP@10':>7} "
        f"{'mAP@all':>7} {'queries':>7}"
    )
    for row in rows:
        print(
            f"{row['name']:<24} {row['whitening']:<9} {epochs:>3} {seconds_per_epoch:>6.1f} "
            f"{row['p_at_10']:>7.4f} {row['map_at_10']:>7.4f} {row['map_all']:>7.4f} "
            f"{row['queries']:>7}"
        )
    print(
        f"train {train_s:.0f}s, embed {embed_s:.1f}s, eval {eval_s:.1f}s, "
        f"final loss {result.losses[-1]:.4f}, checkpoint sha256 {sha[:12]}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "name": name,
                    "preset": args.preset,
                    "overrides": parse_overrides(args.overrides),
                    "epochs": epochs,
                    "seconds_per_epoch": seconds_per_epoch,
                    "train_seconds": train_s,
                    "losses": result.losses,
                    "rows": rows,
                    "sha256": sha,
                }
            )
        )


if __name__ == "__main__":
    main()
