"""Pictures for the HTML reports: thumbnails read from each row's URI (or a placeholder that says why not), and
where every picture goes (files under the report folder, or data: URIs inside one self-contained page)."""

from __future__ import annotations

import base64
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from pipeline.extract.decode import decode_image
from pipeline.extract.items import is_fetch_failure
from pipeline.io import faults, redaction, storage

THUMBNAIL_SIDE = 128  # pixels; square, centre-cropped, so contact sheets line up
THUMBNAIL_QUALITY = 85
FETCH_THREADS = 8  # thumbnails come from object stores one request each: overlap their latency


@dataclass(frozen=True)
class Thumbnail:
    """What the page shows for one image: its redacted URI, and a picture source or the reason there is none."""

    shown_uri: str
    source: str | None  # the <img> src; None when the image could not be read or decoded
    reason: str | None  # why there is no picture (redacted); None when there is one

    @property
    def short_uri(self) -> str:
        """The last two parts of the path (an archive member's own), which tell images apart on a card."""
        member = self.shown_uri.split("::", 1)[0].rstrip("/")
        short = "/".join(member.split("/")[-2:])
        return short if short == self.shown_uri else f"…/{short}"


class Assets:
    """Stores pictures for a report: under `folder` (one file each, linked relatively) or, self-contained, as
    data: URIs in the page itself."""

    def __init__(self, folder: str, self_contained: bool, storage_options: dict | None = None,
                 input_options: dict | None = None):
        self.folder, self.self_contained, self.options = folder, self_contained, storage_options
        self.input_options = input_options  # reach the images the rows name

    def add(self, subfolder: str, name: str, data: bytes, mime: str) -> str:
        """The src for `data`: a data: URI, or `subfolder/name` written beside index.html."""
        if self.self_contained:
            return f"data:{mime};base64,{base64.b64encode(data).decode()}"
        storage.write_bytes(storage.join(self.folder, subfolder, name), data, self.options)
        return f"{subfolder}/{name}"

    def chart(self, name: str, png: bytes) -> str:
        return self.add("charts", f"{name}.png", png, "image/png")


def thumbnail_jpeg(uri: str, input_options: dict | None) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None), or (None, the reason): a missing or unreadable image is a reason, never an exception;
    a failure that is neither the store's nor the image's is a bug and goes up."""
    try:
        data = storage.read_bytes(uri, input_options)
    except Exception as error:  # noqa: BLE001 - classified just below
        if not is_fetch_failure(error):
            raise
        return None, f"fetch failed: {faults.describe_error(error)}"
    decoded = decode_image(data, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), resize="center_crop")
    if decoded.error:
        return None, redaction.redact(decoded.error)
    buffer = io.BytesIO()
    Image.fromarray(decoded.pixels).save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue(), None


def thumbnails(uris: list[str], assets: Assets) -> dict[str, Thumbnail]:
    """A Thumbnail for every distinct uri, fetched in parallel threads with the assets' input options."""
    distinct = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(FETCH_THREADS) as executor:
        results = list(executor.map(lambda uri: thumbnail_jpeg(uri, assets.input_options), distinct))
    shown = {}
    for uri, (jpeg, reason) in zip(distinct, results):
        name = hashlib.sha256(uri.encode()).hexdigest()[:20] + ".jpg"  # no URI text in file names
        source = assets.add("thumbnails", name, jpeg, "image/jpeg") if jpeg is not None else None
        shown[uri] = Thumbnail(redaction.redact(uri), source, reason)
    return shown
