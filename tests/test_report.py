"""The report page (rayclust.report.render) from typed data: names escaped, images inlined, gaps shown.
The whole job on a lake, opened in Chromium: tests/test_lake.py."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from rayclust.features import THUMBNAIL_PIXELS, thumbnail_jpeg
from rayclust.refresh_history import RefreshRecord
from rayclust.report import ClusterSection, Example, ReportData, render
from rayclust.synthetic import draw_image


class PageParts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.scripts, self.sections, self.text = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self.sections.append(attrs["data-cluster"])

    def handle_data(self, data):
        self.text.append(data)


def report_data(thumbnail: bytes) -> ReportData:
    hostile = "<script>alert(1)</script>"
    sections = [
        ClusterSection(0, "tabby cat", [("tabby cat", 0.6), ("tiger cat", 0.3)], 120, 0.91, 7,
                       typical=[Example("k1", 0.99, "photos/k1.jpg", thumbnail), Example("k2", 0.97)],
                       boundary=[Example("k3", 0.31, None, thumbnail)]),
        ClusterSection(1, hostile, [(hostile, 0.5)], 80, 0.75, 0,
                       typical=[Example(hostile, 0.8, f"https://x/{hostile}", thumbnail)]),
        ClusterSection(2, "cluster 2", [], 0, None, 0),
    ]
    rng = np.random.default_rng(0)
    record = RefreshRecord("2026-11-30T12:00:00Z", "run/epoch-3", 2, 0, 200, 1, 0, 0.8, 0.85, 0.05, False)
    return ReportData("s3://bucket/lake", "run/epoch-3", "effnet-lite0:96", "2026-11-30 11:00 UTC", 200, 3,
                      sections, np.arange(20), rng.normal(size=(50, 2)), rng.integers(0, 3, 50), [record])


def test_thumbnail_is_a_small_jpeg_of_the_image():
    image = draw_image(3, np.random.default_rng(0), size=300)
    small = Image.open(io.BytesIO(thumbnail_jpeg(image)))
    assert small.format == "JPEG" and max(small.size) == THUMBNAIL_PIXELS and small.size[0] == small.size[1]
    tiny = Image.open(io.BytesIO(thumbnail_jpeg(draw_image(3, np.random.default_rng(0), size=32))))
    assert tiny.size == (32, 32)  # never enlarged


def test_page_inlines_thumbnails_escapes_names_and_marks_what_is_missing():
    jpeg = thumbnail_jpeg(draw_image(1, np.random.default_rng(1), size=64))
    page = render(report_data(jpeg))
    parts = PageParts()
    parts.feed(page)
    assert parts.scripts == 0, "a cluster name or key became markup"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert parts.sections == ["0", "1", "2"]  # largest first
    assert len(parts.images) == 3 and all(src == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
                                          for src in parts.images)
    text = " ".join(parts.text)
    assert "no thumbnail" in text and "none in the sample" in text and "7 near-duplicates" in text
    assert 'title="k1 (0.99): photos/k1.jpg"' in page  # where the image came from, on hover
    assert "2026-11-30T12:00:00Z" in text and "run/epoch-3" in text
    assert page.count("<circle") == 50 and page.count("<svg") == 3
