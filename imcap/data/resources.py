"""The files a dataset source downloads, declared on the source itself (as torchvision's
datasets carry their `resources`): `Source.resources() -> tuple[Resource, ...]`.

`python -m imcap.data prepare` (imcap/data/download.py) fetches, checks and extracts them; a
source without a `resources` method has nothing to download.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    """One archive to fetch and unpack below a dataset root."""

    filename: str
    url: str | None  # None: behind a sign-up; `manual` says where to get it
    size: int | None = None  # bytes; None: unknown, not checked
    sha256: str | None = None  # None: unknown, not checked
    extract_to: str = "."  # folder below the dataset root
    members: tuple[str, ...] = ()  # extract only these files (by base name) into extract_to
    present: tuple[str, ...] = ()  # any of these below the root means it was placed by hand
    manual: str = ""

    def source(self, base_url: str | None) -> str | None:
        """Where to fetch it: `<base_url>/<filename>` from a mirror, else its own URL."""
        return f"{base_url.rstrip('/')}/{self.filename}" if base_url else self.url


def karpathy_split(member: str) -> Resource:
    """Karpathy's split files of COCO, Flickr8k and Flickr30k come in one zip, of which a source
    keeps one file. Its size and sha256 are published nowhere and not recorded: not checked."""
    return Resource("caption_datasets.zip",
                    "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                    members=(member,), present=(member,))
