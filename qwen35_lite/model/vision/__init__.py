"""Images and video frames in prompts: preprocessing, the vision tower, placeholder expansion and 3-D positions."""

from .positions import expand_image_placeholders, mrope_positions, scatter_image_features, tokens_per_image
from .preprocess import ImageProcessorConfig, load_image, preprocess, smart_resize, to_rgb
from .tower import VisionTower

__all__ = [
    "ImageProcessorConfig",
    "VisionTower",
    "expand_image_placeholders",
    "load_image",
    "mrope_positions",
    "preprocess",
    "scatter_image_features",
    "smart_resize",
    "to_rgb",
    "tokens_per_image",
]
