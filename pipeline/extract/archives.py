"""Archive inputs: tar (`.tar`, `.tar.gz`, `.tgz`) and `.zip` files whose image members are the images.

What a member is in the output: one row whose `uri` is the fsspec chained URL of the member
(`tar://dir/x.jpg::s3://bucket/shards/00042.tar`, `zip://x.jpg::file:///data/a.zip`), which `fsspec.open` reads
back, and whose `key` is the WebDataset sample key (the member path up to the first dot of its file name:
`dir/x.seg.jpg` -> `dir/x`). Labels can come from a sibling member of the same key (`input.labels: member:cls`)
or a field of its `.json` member (`input.labels: json:FIELD`).

The design: an archive is read as one stream, front to back, twice in all and never once per member.
- Listing reads each archive once: tar has no index, so its member names (and the sidecars labels come from)
  are only known by streaming the whole archive; for big shards that is a full read, done on the driver before
  Ray starts. The listing keeps the members in stream order, so the manifest, the plan and the ledger work
  unchanged: a member is one manifest row, a shard a contiguous run of rows, resumable and exactly once.
- A worker whose shard holds members of an archive streams that archive once, decodes the members its shard
  names as they pass, and stops reading when it has them all. With `run.shard_size` at least the members of an
  archive, an archive is read by one or two shards (where a shard boundary falls inside it).
- Zip keeps its index (the central directory) at the end of the file, so a remote zip is first copied to a local
  temporary file in one sequential download and read there; ranged reads of the index and then of each member
  would be one request per member.

What a damaged archive gives: a member whose bytes do not decode is an error row with the decoder's reason, as a
loose file is; a truncated or corrupt archive gives its good members plus one error row saying where it broke
(the member whose data was cut, or the byte offset where the next header was missing); its `uri` is
`tar://#broken-at-byte-N::...` when no member owns the break.
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.contract import JSON_LABELS, MEMBER_LABELS
from pipeline.io import storage

TAR, ZIP = "tar", "zip"
ARCHIVE_SUFFIXES = ((".tar", TAR), (".tar.gz", TAR), (".tgz", TAR), (".zip", ZIP))
# WebDataset's split of a member path into the sample key and the extension: up to the first dot of the name.
KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# Hidden members (`._x.jpg`, `.git/`, `__MACOSX/`) are skipped, as in directory listings.
HIDDEN_MEMBER = re.compile(r"(?:^|/)(?:\.|__MACOSX/)")
BREAK_MARKER = "#broken-at-byte-"  # the member part of the error row of a break no member owns
BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
# What a broken archive raises while it is read: tarfile's own errors, a cut gzip/zlib stream, a bad zip.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, zipfile.BadZipFile)


# ------------------------------------------------------------------------------------------ URIs and keys


def expand_braces(uri: str) -> list[str]:
    """WebDataset's brace notation, before any glob: `{00000..00009}` (a range, zero-padded to the width of its
    first bound) and `{a,b}` (a list), the leftmost first, so several braces multiply."""
    matches = [(match, expand) for pattern, expand in ((BRACE_RANGE, brace_range), (BRACE_LIST, brace_list))
               if (match := pattern.search(uri))]
    if not matches:
        return [uri]
    match, expand = min(matches, key=lambda pair: pair[0].start())
    head, tail = uri[:match.start()], uri[match.end():]
    return [expanded for part in expand(match) for expanded in expand_braces(head + part + tail)]


def brace_list(match: re.Match) -> list[str]:
    return match.group(1).split(",")


def brace_range(match: re.Match) -> list[str]:
    first, last = match.group(1), match.group(2)
    width = len(first.lstrip("-")) if first.lstrip("-").startswith("0") else 0
    step = 1 if int(last) >= int(first) else -1
    return [str(number).zfill(width) if number >= 0 else "-" + str(-number).zfill(width)
            for number in range(int(first), int(last) + step, step)]


def archive_format(uri: str) -> str | None:
    """`tar` or `zip` for an archive's name (a glob of them included), None for anything else."""
    lowered = uri.lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES if lowered.endswith(suffix)), None)


def member_uri(kind: str, member: str, archive_uri: str) -> str:
    """The fsspec chained URL of one member; a local archive is spelled as an absolute file:// URL."""
    return f"{kind}://{member}::{storage.local_path_uri(archive_uri)}"


def split_member_uri(uri: str) -> tuple[str, str, str] | None:
    """(kind, member path, archive URI) of a chained member URL; None for any other URI."""
    for _, kind in ARCHIVE_SUFFIXES:
        prefix = kind + "://"
        if uri.startswith(prefix) and "::" in uri:
            member, archive_uri = uri[len(prefix):].split("::", 1)
            return kind, member, archive_uri
    return None


def archive_of(uri: str) -> str | None:
    """The archive a member URL points into (None for a loose file)."""
    parts = split_member_uri(uri)
    return parts[2] if parts else None


def sample_key(member: str) -> str | None:
    """The WebDataset key of a member path (`a/b.seg.png` -> `a/b`); None for a name without an extension."""
    match = KEY_AND_EXTENSION.match(member)
    return match.group(1) if match else None


def member_key(uri: str) -> str | None:
    """The `key` column of a row: its sample key for an archive member, None for a loose file or a break row."""
    parts = split_member_uri(uri)
    if parts is None or parts[1].startswith(BREAK_MARKER):
        return None
    return sample_key(parts[1])


def is_image_member(member: str, extensions: tuple[str, ...]) -> bool:
    lowered = member.lower()
    return (HIDDEN_MEMBER.search(member) is None
            and any(lowered.endswith("." + extension.lower().lstrip(".")) for extension in extensions))


# ------------------------------------------------------------------------------------------ labels


def label_sidecar_extension(labels: str) -> str | None:
    """The extension of the member a label is read from (`member:cls` -> `cls`, `json:class` -> `json`)."""
    if labels.startswith(MEMBER_LABELS):
        return labels[len(MEMBER_LABELS):]
    if labels.startswith(JSON_LABELS):
        return "json"
    return None


def label_from_sidecar(labels: str, data: bytes) -> str | None:
    """The label a sidecar's bytes give: the text of a `member:EXT` member, or one field of a `.json` member
    (`json:a.b` walks nested objects). Unreadable text or a missing field is an unlabelled row, not a failure."""
    try:
        text = data.decode("utf-8")
        if labels.startswith(MEMBER_LABELS):
            return text.strip()
        value = json.loads(text)
        for name in labels[len(JSON_LABELS):].split("."):
            value = value[name]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
        return None
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Member:
    """One regular-file member, in stream order; `data` only when it was asked for; `error` when the archive
    broke inside its data (the member is cut short)."""

    name: str
    offset: int
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class ArchiveBreak:
    """Where a truncated or corrupt archive stopped: the member cut short (None when the break fell between
    members or inside a header) and the byte offset (of the uncompressed tar stream)."""

    offset: int
    member: str | None
    reason: str

    def describe(self) -> str:
        where = f"in member {self.member!r} at byte {self.offset}" if self.member else f"at byte {self.offset}"
        return f"truncated or corrupt archive: it breaks {where}: {self.reason}"


def read_members(archive_uri: str, kind: str, options: dict, wanted: Callable[[str], bool],
                 open_stream: Callable | None = None) -> Iterator[Member | ArchiveBreak]:
    """Every regular-file member in stream order, with its bytes where `wanted(name)`, then an ArchiveBreak if
    the archive did not end cleanly. Storage failures (missing, denied) raise, for the caller to classify.
    A tar is read through `open_stream(uri)` (default: fsspec with `options`)."""
    if kind == TAR:
        yield from read_tar_members(archive_uri, open_stream or (lambda uri: storage.open_stream(uri, options)),
                                    wanted)
    else:
        yield from read_zip_members(archive_uri, options, wanted)


def read_tar_members(archive_uri: str, open_stream: Callable, wanted: Callable[[str], bool]
                     ) -> Iterator[Member | ArchiveBreak]:
    """One sequential pass (`r|*`: plain or compressed, no seeking), so a remote tar is one stream of reads."""
    with open_stream(archive_uri) as handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r|*")
        except ARCHIVE_ERRORS as error:
            yield ArchiveBreak(0, None, f"not a readable tar ({error})")
            return
        with archive:
            yield from tar_members(archive, wanted)


def tar_members(archive: tarfile.TarFile, wanted: Callable[[str], bool]) -> Iterator[Member | ArchiveBreak]:
    last: tarfile.TarInfo | None = None
    try:
        for info in archive:
            last = info
            if not info.isfile():
                continue
            if not wanted(info.name):
                yield Member(info.name, info.offset)
                continue
            try:
                data = archive.extractfile(info).read()
            except ARCHIVE_ERRORS as error:
                broken = ArchiveBreak(info.offset, info.name, str(error))
                yield Member(info.name, info.offset, error=broken.describe())
                yield broken  # a stream cannot go on past a cut member: what follows is lost too
                return
            yield Member(info.name, info.offset, data)
    except ARCHIVE_ERRORS as error:  # skipping a member's data ran out, or the next header is damaged
        yield cut_member_break(archive, last) or ArchiveBreak(archive.offset, None, str(error) or type(error).__name__)
        return
    broken = cut_member_break(archive, last) or end_of_stream_break(archive)
    if broken:
        yield broken


def cut_member_break(archive: tarfile.TarFile, last: tarfile.TarInfo | None) -> ArchiveBreak | None:
    """The last member's data ends beyond what the stream held: the archive breaks inside that member."""
    if last is not None and last.isfile() and last.offset_data + last.size > archive.fileobj.pos:
        return ArchiveBreak(last.offset, last.name, "the member's data is cut short")
    return None


def end_of_stream_break(archive: tarfile.TarFile) -> ArchiveBreak | None:
    """tarfile ends its iteration quietly when the stream stops at or inside a header; a whole tar ends with
    a zero block, so fewer than 512 bytes read past the next header's offset means the archive was cut."""
    read_to = archive.fileobj.pos  # bytes of the (uncompressed) stream tarfile consumed
    if read_to - archive.offset < tarfile.BLOCKSIZE:
        return ArchiveBreak(archive.offset, None, "the archive ends without its end-of-archive block")
    return None


def read_zip_members(archive_uri: str, options: dict, wanted: Callable[[str], bool]
                     ) -> Iterator[Member | ArchiveBreak]:
    """Zip's index is at its end: a remote zip is copied locally in one download, then read at random."""
    with storage.local_copy(archive_uri, options) as path:
        try:
            archive = zipfile.ZipFile(path)
        except ARCHIVE_ERRORS as error:
            yield ArchiveBreak(0, None, f"not a readable zip, its index (central directory) is missing or "
                                        f"damaged ({error})")
            return
        with archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if not wanted(info.filename):
                    yield Member(info.filename, info.header_offset)
                    continue
                yield zip_member(archive, info)


def zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """A member whose compressed data is damaged (bad CRC, bad deflate stream) is that member's error only."""
    try:
        return Member(info.filename, info.header_offset, archive.read(info))
    except (*ARCHIVE_ERRORS, NotImplementedError, RuntimeError) as error:  # unknown compression, encrypted
        return Member(info.filename, info.header_offset,
                      error=f"damaged zip member at byte {info.header_offset}: {error}")


# ------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class ArchiveListing:
    """The rows one archive gives, in stream order: chained member URLs and their labels."""

    uris: list[str]
    labels: list[str | None]


def list_archive(archive_uri: str, extensions: tuple[str, ...], labels: str, options: dict) -> ArchiveListing:
    """Stream the archive once: its image members (one row each), the labels of their sidecars, and one more row
    where it broke unless the break is inside an image member (that member's row is the error row then)."""
    kind = archive_format(archive_uri)
    sidecar = label_sidecar_extension(labels)
    images: list[str] = []
    labels_by_key: dict[str, str | None] = {}
    broken: ArchiveBreak | None = None
    for item in read_members(archive_uri, kind, options, lambda name: is_sidecar(name, sidecar)):
        if isinstance(item, ArchiveBreak):
            broken = item
        elif is_image_member(item.name, extensions):
            images.append(item.name)
        elif item.data is not None:
            labels_by_key[sample_key(item.name)] = label_from_sidecar(labels, item.data)
    members = images + ([] if broken is None or broken.member in images else [break_member_name(broken)])
    return ArchiveListing([member_uri(kind, member, archive_uri) for member in members],
                          [member_label(member, labels, labels_by_key) for member in members])


def is_sidecar(member: str, sidecar_extension: str | None) -> bool:
    match = KEY_AND_EXTENSION.match(member)
    return sidecar_extension is not None and match is not None and match.group(2) == sidecar_extension


def break_member_name(broken: ArchiveBreak) -> str:
    """The member part of a break's row: the member cut short, or a marker with the byte offset."""
    return broken.member or f"{BREAK_MARKER}{broken.offset}"


def member_label(member: str, labels: str, labels_by_key: dict[str, str | None]) -> str | None:
    if member.startswith(BREAK_MARKER) or labels == "none":
        return None
    if labels == "from_dirs":  # the member's own directory inside the archive ("" at the top)
        return member.rsplit("/", 2)[-2] if "/" in member else ""
    return labels_by_key.get(sample_key(member))
