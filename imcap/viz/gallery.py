"""A self-contained HTML gallery of test images with generated and reference captions."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from imcap.data.images import load_image
from imcap.data.records import CaptionRecord


def _thumbnail_data_uri(path: str, size: int = 256) -> str:
    image = load_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_gallery(
    records: Sequence[CaptionRecord], predictions: Sequence[dict], path: str | Path, title: str = "imcap gallery"
) -> Path:
    """One card per prediction (in order): thumbnail, generated caption, references.

    Thumbnails are embedded, so the file can be mailed or opened anywhere.
    """
    by_id = {r.image_id: r for r in records}
    cards = []
    for pred in predictions:
        record = by_id[pred["image_id"]]
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in record.captions)
        cards.append(
            f'<div class="card"><img src="{_thumbnail_data_uri(record.image_path)}" alt="">'
            f'<p class="gen">{html.escape(pred["caption"])}</p>'
            f'<p class="id">{html.escape(str(record.image_id))}</p><ul>{refs}</ul></div>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{width:270px;border:1px solid #ddd;border-radius:6px;padding:6px}} .card img{{max-width:256px}}
.gen{{font-weight:bold}} .id{{color:#888;font-size:80%}} ul{{font-size:85%;padding-left:1.1em;color:#444}}</style>
</head><body><h2>{html.escape(title)}</h2><p>bold: generated caption; list: references</p>
<div class="grid">{"".join(cards)}</div></body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
