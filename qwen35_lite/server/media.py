"""An image_url or video_url part → a file the server may read: a data URL decoded into the request's own temporary
directory, or a local file under --allowed-local-media-path (none by default). Nothing is fetched.

Every refused local path gets the same message, whether it exists or not, so a client learns nothing
about the server's files; and messages about an image name it by its place in the request, never by the
server's (temporary) path."""

from __future__ import annotations

import base64
import binascii
import os
import stat
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import InputError, Qwen35Error
from .protocol import APIError, bad_request

IMAGE_SUFFIX = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "gif": ".gif", "bmp": ".bmp"}
VIDEO_SUFFIX = {"mp4": ".mp4", "quicktime": ".mov", "webm": ".webm", "x-matroska": ".mkv", "avi": ".avi"}


def refused_path(allowed: Path | None, kind: str = "image") -> APIError:
    """The one answer to every local path the server does not read."""
    if allowed is None:
        how = "this server reads no local files (its --allowed-local-media-path is not set)"
    else:
        how = "it must name a regular file under the server's --allowed-local-media-path"
    an = "a video_url" if kind == "video" else "an image_url"
    return bad_request(f"{an} that is a local path was refused: {how}; send a data URL instead", "messages")


def image_file(url: Any, image_dir: Path, n: int, allowed: Path | None, kind: str = "image") -> str:
    """A path the image (kind "video": the video) opener may read for the n-th medium's url (`allowed`: the
    resolved directory local paths must resolve into, None for none)."""
    example = "data:video/mp4;base64,..." if kind == "video" else "data:image/png;base64,..."
    if not isinstance(url, str) or not url:
        raise bad_request(
            f"{'a video_url' if kind == 'video' else 'an image_url'} part has no url", "messages"
        )
    if url.startswith("data:"):
        return _data_url(url, image_dir, n, kind, example)
    if url.startswith(("http://", "https://")):
        raise bad_request(
            f"{kind} URLs are never fetched from the network: send a data URL ({example})", "messages"
        )
    return local_file(url, allowed, kind)


def _data_url(url: str, image_dir: Path, n: int, kind: str = "image", example: str = "") -> str:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise bad_request(
            f"{'a' if kind == 'video' else 'an'} {kind} data URL must be base64 ({example})", "messages"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            f"{'a' if kind == 'video' else 'an'} {kind} data URL is not valid base64", "messages"
        ) from None
    subtype = header.removeprefix("data:").removesuffix(";base64").partition("/")[2]
    suffix = (VIDEO_SUFFIX if kind == "video" else IMAGE_SUFFIX).get(
        subtype, ".vid" if kind == "video" else ".img"
    )
    path = image_dir / f"{kind}{n}{suffix}"
    path.write_bytes(data)
    return str(path)


def local_file(url: str, allowed: Path | None, kind: str = "image") -> str:
    """The resolved path of a local path or file:// URL, if it is a regular file inside `allowed`.

    Resolved first (symlinks and `..` followed, as the opener would follow them), then checked, and the
    resolved path is what gets opened. A relative path is taken under `allowed`."""
    if allowed is None or "\0" in url:
        raise refused_path(allowed, kind)
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise refused_path(allowed, kind)
        url = urllib.request.url2pathname(parts.path)
    try:
        path = os.path.realpath(allowed / Path(url).expanduser())
        inside = os.path.commonpath([path, allowed]) == str(allowed)
        regular = inside and stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError, RuntimeError):  # missing, unreadable, a name too long, an unknown ~user
        regular = False
    if not regular:
        raise refused_path(allowed, kind)
    return path


def allowed_dir(path: str | Path | None) -> Path | None:
    """--allowed-local-media-path resolved once (None: no local file is read); it must be a directory."""
    if path is None:
        return None
    resolved = Path(os.path.realpath(Path(path).expanduser()))
    if not resolved.is_dir():
        raise InputError(
            f"--allowed-local-media-path {path} is not a directory",
            "name the directory whose images clients may send by path",
        )
    return resolved


def hide_paths(e: Qwen35Error, paths: list) -> Qwen35Error:
    """`e` with each medium's path replaced by its place in the request ("image 1", "video 2"): the
    server's temporary paths stay private, and a client's own path is still recognisable by its number."""
    message, hint = e.message, e.hint or ""
    counts = {"image": 0, "video": 0}
    for p in paths:
        kind = "video" if type(p).__name__ == "Video" else "image"
        counts[kind] += 1
        path, name = os.fspath(p), f"{kind} {counts[kind]}"
        message, hint = message.replace(path, name), hint.replace(path, name)
        base = os.path.basename(path)  # notes and some messages name the file alone
        message, hint = message.replace(base, name), hint.replace(base, name)
    return type(e)(message, hint)
