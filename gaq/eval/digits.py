"""Digit-likeness of images, judged by the bundled classifier."""

from __future__ import annotations

import torch

# "digit-like": the judge's top class probability reaches this. The bundled classifier is
# trained to be unsure on non-digits, so its confidence reads as digit-likeness; other judges
# (gaq.eval.judges) reuse the same threshold so their shares compare.
DIGIT_LIKE_CONFIDENCE = 0.8


@torch.no_grad()
def digit_likeness(images: torch.Tensor, confidence: float = DIGIT_LIKE_CONFIDENCE,
                   classifier: torch.nn.Module | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, float]:
    """Share of images the bundled classifier assigns to one digit with probability
    >= ``confidence`` (it is trained to be unsure on non-digits), the mean top probability,
    and with the requested ``labels`` of class-conditional samples, the share classified as
    requested (``class_accuracy``). Runs on the classifier's device (pass one loaded once
    on the GPU when scoring there); the images are moved to it."""
    from gaq.models.bundled import load_classifier

    clf = classifier if classifier is not None else load_classifier()
    device = next(clf.parameters()).device
    prob = torch.softmax(clf(images.to(device=device, dtype=torch.float32)), dim=1)
    top = prob.max(dim=1).values
    out = {"confident_share": (top >= confidence).float().mean().item(),
           "mean_top_prob": top.mean().item()}
    if labels is not None:
        out["class_accuracy"] = (prob.argmax(1) == labels.to(device)).float().mean().item()
    return out
