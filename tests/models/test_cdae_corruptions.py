"""The generic corruptions of the CDAE (flip, blur, contrast, brightness) and its step schedule."""

from __future__ import annotations

import torch

from models.cdae import CDAEConfig, corrupt, epochs_for


def _only(**values: float) -> CDAEConfig:
    """A config whose only corruption is ``values`` (no noise)."""
    return CDAEConfig.from_dict({**CDAEConfig().to_dict(), "noise_factor": 0.0, **values})


def _ramp(n: int = 8) -> torch.Tensor:
    """(n, 1, 12, 12) images whose intensity rises left to right: a mirror is visible."""
    row = torch.linspace(0.1, 0.9, 12)
    return row.expand(n, 1, 12, 12).clone()


def test_flip_mirrors_some_images_left_to_right_and_leaves_the_others() -> None:
    x = _ramp(64)
    out = corrupt(x, config=_only(flip_prob=0.5), generator=torch.Generator().manual_seed(0))
    flipped = torch.isclose(out, x.flip(3)).flatten(1).all(1)
    kept = torch.isclose(out, x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 10 < int(flipped.sum()) < 54


def test_blur_keeps_the_mean_and_softens_an_edge() -> None:
    x = torch.zeros(4, 1, 16, 16)
    x[:, :, :, 8:] = 1.0
    out = corrupt(x, config=_only(blur_sigma=2.0), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    steepest = (out[..., 1:] - out[..., :-1]).abs().amax(dim=(1, 2, 3))
    assert bool((steepest < 1.0).any())  # at least one image drew a visible blur
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_contrast_and_brightness_move_intensities_within_their_range() -> None:
    x = _ramp(32)
    out = corrupt(x, config=_only(contrast=0.5, brightness=0.2), generator=torch.Generator().manual_seed(2))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    spread_in = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    spread_out = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    ratio = spread_out / spread_in
    assert bool((ratio > 0.49).all()) and bool((ratio < 1.51).all())
    assert float(ratio.std()) > 0.05  # each image its own draw
    again = corrupt(x, config=_only(contrast=0.5, brightness=0.2), generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


def test_epochs_for_gives_a_small_collection_enough_steps() -> None:
    config = CDAEConfig.from_dict(
        {**CDAEConfig().to_dict(), "epochs": 10, "min_steps": 1000, "batch_size": 100}
    )
    assert epochs_for(config, images=60_000) == 10  # 600 steps a epoch: the config's epochs
    assert epochs_for(config, images=1_000) == 100  # 10 steps an epoch: 1,000 steps
    assert epochs_for(config, images=1_000, epochs=3) == 3  # an explicit count wins
    assert epochs_for(CDAEConfig(), images=50) == CDAEConfig().epochs  # no minimum by default
