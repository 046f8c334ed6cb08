"""The HTML gallery: one self-contained card per prediction."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from imcap.data.records import CaptionRecord
from imcap.viz.gallery import write_gallery
from tests.helpers.images import write_image


def test_one_card_per_prediction_with_an_embedded_thumbnail_and_escaped_text(tmp_path):
    records = [CaptionRecord(i, str(write_image(tmp_path / f"{i}.png", (200, 10 * i, 0), size=400)),
                             (f"reference <{i}>", "another one"), "test") for i in range(3)]
    predictions = [{"image_id": 2, "caption": "a <b>bold</b> claim"}, {"image_id": 0, "caption": "a red square"}]
    page = write_gallery(records, predictions, tmp_path / "out" / "gallery.html", title="run & split").read_text()
    assert page.count('class="card"') == 2
    assert "a &lt;b&gt;bold&lt;/b&gt; claim" in page and "<b>bold" not in page
    assert "reference &lt;2&gt;" in page and "reference &lt;1&gt;" not in page  # only predicted images
    assert "<title>run &amp; split</title>" in page
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 2
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert max(thumbnail.size) == 256  # shrunk from 400 px, so the page stays small
