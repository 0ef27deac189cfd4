"""The DEXTR seed's documents: its Redis-mode reply and OPEX (object predictions exchange format).

Standard library only: the DEXTR bridges (clients/bridges) import this module without torch.
"""
import base64
from datetime import datetime
from typing import Any, Optional, Sequence

DEXTR_META = {"segmenter": {"type": "dextr"}}
OPEX_TIMESTAMP = "%Y%m%d_%H%M%S.%f"  # the opex library's timestamp format


def interactive_segment_reply(mask_png: bytes, contours: list, points: Sequence[Sequence[float]], label: int) -> dict[str, Any]:
    """The DEXTR seed's reply (its Redis mode): {"mask": base64 PNG, "contours": [[[x, y], ...], ...],
    "meta": {"segmenter": {"type": "dextr"}, "prompt": {"points", "label"}}}."""
    return {
        "mask": base64.b64encode(mask_png).decode("ascii"),
        "contours": contours,
        "meta": {**DEXTR_META, "prompt": {"points": [list(point) for point in points], "label": label}},
    }


def opex_document(contours: list, label: int, object_id: str, meta: dict[str, str], timestamp: Optional[datetime] = None) -> dict[str, Any]:
    """OPEX: one object per contour with its label, integer bounding box and polygon; `meta` values must be
    strings (the opex schema)."""
    objects = []
    for polygon in contours:
        xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
        objects.append({
            "label": str(label),
            "bbox": {"left": min(xs), "top": min(ys), "right": max(xs), "bottom": max(ys)},
            "polygon": {"points": [[x, y] for x, y in polygon]},
        })  # fmt: skip
    stamp = (timestamp or datetime.now()).strftime(OPEX_TIMESTAMP)
    return {"timestamp": stamp, "id": object_id, "objects": objects, "meta": {key: str(value) for key, value in meta.items()}}
