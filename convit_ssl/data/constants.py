"""Normalisation statistics (timm.data.constants): ImageNet's, which the paper's
weights, timm's hub configs and the analyses' defaults use."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
