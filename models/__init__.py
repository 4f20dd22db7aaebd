"""The neural networks: embedders that turn images into float32 rows, and their training.

Importing any part of ``models`` imports the concrete model modules below, and each registers
its embedders (and classifier archs) with ``models.registry`` (``models.classifier``); the
registries import no concrete model, as in torchvision.
"""

from models import cdae, classifier, cnn, head, lenet, pixels, registry

__all__ = ["cdae", "classifier", "cnn", "head", "lenet", "pixels", "registry"]
