"""Attribution maps per image and their scores: gradients, backprop rules, CAMs, occlusion."""

from jobs.attribution import (  # noqa: F401  (importing registers them)
    attribution_summary,
    cam,
    deconvnet,
    grad_cam,
    guided_backprop,
    guided_grad_cam,
    occlusion,
    saliency,
)
