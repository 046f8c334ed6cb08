"""The HTML gallery with hostile text in captions, references, image ids and the title: parsed
back, the page holds that text as text, and no element or attribute it could have injected."""

from __future__ import annotations

from html.parser import HTMLParser

from PIL import Image

from imcap.data.records import CaptionRecord
from imcap.viz.gallery import write_gallery

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>"\'&amp;'
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h2", "p", "div", "img", "ul", "li"}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.texts = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]

    def handle_data(self, data):
        self.texts.append(data)


def test_script_in_a_caption_reference_image_id_or_title_stays_text(tmp_path):
    Image.new("RGB", (16, 16), "green").save(tmp_path / "a.jpg")
    records = [CaptionRecord(f"id {HOSTILE}", str(tmp_path / "a.jpg"), (f"ref {HOSTILE}", "a plain one"), "test")]
    predictions = [{"image_id": records[0].image_id, "caption": f"gen {HOSTILE}"}]
    path = write_gallery(records, predictions, tmp_path / "gallery.html", title=f"title {HOSTILE}")
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert set(page.tags) <= PAGE_TAGS and "script" not in page.tags
    assert page.tags.count("img") == 1  # the thumbnail only
    assert not [a for a in page.attributes if a.startswith("on")]
    for text in (f"gen {HOSTILE}", f"ref {HOSTILE}", f"id {HOSTILE}", f"title {HOSTILE}"):
        assert text in page.texts  # shown as written, entities and all
