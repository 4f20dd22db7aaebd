"""The CDAE's config (input, network, corruption, loss, optimisation, code) and its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.checkpoints import config_from_dict


@dataclass
class CDAEConfig:
    """Everything that defines a CDAE: input, network, corruption, loss, optimisation.

    The defaults are the tutorial network (Keras blog "Building autoencoders in Keras",
    denoising section) so that an empty config means the well-known reference;
    ``CDAEConfig.preset("default")`` is the tuned one cbir trains.
    """

    # --- input: what the collection's images are turned into (preprocessing travels with it)
    image_size: int = 28  # square side in pixels; MNIST's native size
    channels: int = 1  # 1 = greyscale; the only kind trained so far

    # --- network
    encoder_channels: tuple[int, ...] = (16, 8, 8)  # 3x3 conv + 2x2 max-pool per entry
    code_dim: int | None = None  # None: the last conv map is the code (4x4x8 = 128 for MNIST);
    # an int adds a linear bottleneck of that width, free of the spatial layout of the map
    batch_norm: bool = False  # the tutorial has none; a small net trains fine without it

    # --- corruption (training only): the input is corrupted, the CLEAN image is the target
    noise_factor: float = 0.5  # Gaussian noise std, then clipped to [0, 1] (tutorial: 0.5)
    rotate_degrees: float = 0.0  # uniform rotation in [-r, r]
    shift_pixels: float = 0.0  # uniform translation in [-s, s] pixels on each axis
    scale_range: float = 0.0  # uniform zoom in [1 - a, 1 + a]
    elastic_pixels: float = 0.0  # std of a smooth random displacement field, in pixels
    erase_prob: float = 0.0  # chance of zeroing one random rectangle (2-20% of the area)
    flip_prob: float = 0.0  # chance of a left-right mirror (only where mirrors mean the same)
    blur_sigma: float = 0.0  # Gaussian blur, std uniform in [0, b] pixels (focus, resolution)
    contrast: float = 0.0  # contrast factor uniform in [1 - c, 1 + c] about the image's mean
    brightness: float = 0.0  # uniform shift in [-b, b] of the [0, 1] intensity scale

    # --- loss
    consistency_weight: float = 0.0  # > 0: two corrupted views per image, and a term that
    # pulls their codes together; no labels, the pairing comes from the corruption itself
    consistency: str = "nt_xent"  # "cosine": 1 - cos(z1, z2); "nt_xent": contrastive, the
    # other images of the batch are the negatives, which keeps the codes from collapsing
    temperature: float = 0.1  # nt_xent softmax temperature (SimCLR's usual range 0.1-0.5)

    # --- optimisation
    optimizer: str = "adadelta"  # "adadelta" (lr 1.0, the tutorial's) or "adam"
    lr: float = 1.0
    weight_decay: float = 0.0
    cosine_schedule: bool = False  # decay lr to 0 over the run: better end point, same cost
    batch_size: int = 128  # the tutorial's; small enough for many updates per epoch
    epochs: int = 20  # the default for `cbir train`; a training call may override it
    min_steps: int = 0  # train at least this many batches: a small collection gets more epochs

    # --- code post-processing, fitted on the training set's own codes (unsupervised)
    whiten: bool = False  # PCA-whiten the L2-normalised codes; stored in the checkpoint
    whiten_dims: int | None = None  # keep the top components (None: all)
    whiten_shrinkage: float = 0.0  # eigenvalues += shrinkage * mean eigenvalue, so noise
    # directions with tiny variance are not blown up to the same weight as the digit's shape

    # --- a linear part of the code: the image's top principal components, fitted on the training
    # images' pixels (unsupervised). The learned part carries the invariances; this part keeps
    # what they throw away, so a wrong invariance costs less.
    pixel_pca_dims: int = 0  # > 0: append that many components (capped by pixels and images)
    pixel_pca_weight: float = 1.0  # both parts are unit vectors; this scales the linear one

    @classmethod
    def preset(cls, name: str) -> CDAEConfig:
        """``"tutorial"``: the reference network; ``"default"``: cbir's CDAE for any collection;
        ``"strokes"``: the handwriting invariances (rotation, elastic wobble, erased strokes)."""
        if name == "tutorial":
            return cls()
        if name in PRESETS:
            return cls(**PRESETS[name])
        raise ValueError(f"unknown CDAE preset {name!r}; known: tutorial, {', '.join(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["encoder_channels"] = list(self.encoder_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CDAEConfig:
        values = dict(data)
        if "encoder_channels" in values:
            values["encoder_channels"] = tuple(int(c) for c in values["encoder_channels"])
        return config_from_dict(cls, values, what="CDAE")


# The handwriting preset, chosen on MNIST by the ablation in benchmarks/cdae_mnist.py (table in
# its docstring). Every change is against the tutorial; all of it is label-free.
_STROKES_PRESET: dict[str, Any] = {
    # Denoise against what handwriting retrieval must ignore: the same digit moved, turned,
    # resized, bent or partly missing must reconstruct to the same clean image.
    "noise_factor": 0.3,  # lighter than 0.5: the geometry now does most of the corrupting
    "rotate_degrees": 15.0,
    "shift_pixels": 2.0,
    "scale_range": 0.1,
    "elastic_pixels": 1.0,
    "erase_prob": 0.3,
    # Two corruptions per image and NT-Xent between their codes: the biggest single gain
    # (mAP@all 0.37 -> 0.59 at 3 epochs); the cosine-only term barely helps (0.41).
    "consistency_weight": 1.0,
    "consistency": "nt_xent",
    "temperature": 0.1,  # 0.05: same P@10, lower mAP; 0.2: lower P@10
    # A linear, signed code instead of the post-ReLU 4x4x8 map: P@10 0.93 -> 0.96.
    "code_dim": 128,
    # 16 channels in every stage (the tutorial narrows to 8): +9% time, +0.01 P@10. The
    # first stage stays at 16 because the 28x28 convs dominate the cost (32: 2.2x).
    "encoder_channels": (16, 16, 16),
    "optimizer": "adam",  # adadelta learns too slowly for a 10-epoch budget
    "lr": 2e-3,
    "cosine_schedule": True,
    "epochs": 10,  # fits the ~10 minute budget on 2 CPU cores
}

# cbir's default for any collection: the same network, loss and optimiser, with corruptions that
# are not specific to one domain, and a linear part of the code. Chosen on the generalisation
# suite (`cbir bench quality`; docs/quality.md has the ablation on all of its sets).
_DEFAULT_PRESET: dict[str, Any] = {
    **_STROKES_PRESET,
    # Out: the invariances of handwriting. Elastic wobble and erased rectangles teach the code to
    # ignore local shape and missing parts, which are the class on garments, logos or parts.
    "elastic_pixels": 0.0,
    "erase_prob": 0.0,
    # Kept small: a camera's framing (2 px, 10% zoom) and tilt (10 degrees; 15 lost P@10 where
    # orientation is the class, 0 lost it everywhere else).
    "rotate_degrees": 10.0,
    # In: what any camera or scanner varies: focus, exposure and contrast, sensor noise.
    "blur_sigma": 1.0,
    "contrast": 0.2,
    "brightness": 0.1,
    # The top 64 principal components of the collection's pixels, appended to the code with equal
    # weight: where a learned invariance is wrong for a collection, its cosine still sees the image
    # as raw pixels do (+0.01-0.02 P@10 where orientation is the class).
    "pixel_pca_dims": 64,
    "pixel_pca_weight": 1.0,
    # At least 1,000 batches: a collection of a few thousand images still trains (10 epochs of
    # 1,500 images would be 120 steps).
    "min_steps": 1000,
}
PRESETS: dict[str, dict[str, Any]] = {"default": _DEFAULT_PRESET, "strokes": _STROKES_PRESET}
