"""Models: reference architectures, small trained CNNs and MiniLM, all loadable offline."""

from secateurs.models.cnn import digits_cnn, mnist1d_cnn
from secateurs.models.data import (
    DataSplit,
    calibration_batches,
    load_dataset,
    load_digits,
    load_mnist1d,
    text_batches,
    text_paragraphs,
)
from secateurs.models.reference import REFERENCE_MODELS, ReferenceModel
from secateurs.models.zoo import ModelInfo, accuracy, load, names

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceModel",
    "DataSplit",
    "ModelInfo",
    "accuracy",
    "calibration_batches",
    "digits_cnn",
    "load",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "mnist1d_cnn",
    "names",
    "text_batches",
    "text_paragraphs",
]
