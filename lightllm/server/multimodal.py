"""Images in requests (API process): image URLs → checked image files, and their places in the prompt.

An image arrives as a `data:image/...;base64,` URL, or as a `file://` URL under `--allowed_local_media_path`;
this server fetches nothing (http(s) URLs are refused). Each is decoded here with PIL, so a corrupt, truncated
or unsupported file, one over `--max_image_pixels` or more than `--limit_mm_per_prompt` images get a 400 before
the engine sees them. The chat text holds the model's image marker where each image goes; `encode_with_images`
expands each marker into the model's run of placeholder tokens (as many as the image's size gives), as
transformers' processors expand the text before tokenizing, and tells the engine where the runs are
(engine/protocol.py's ImageInput). No model code here: the model's image layout (models/vision/layout.py) comes
in its EngineReady.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import unquote, urlparse

from lightllm.engine.protocol import EngineReady, ImageInput
from lightllm.models.vision.layout import LayoutText
from lightllm.server.args import ServerArgs
from lightllm.server.errors import APIError

if TYPE_CHECKING:
    from lightllm.server.state import ServerState

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # the image file formats taken (PIL's names)
DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


@dataclass(frozen=True)
class RequestImage:
    data: bytes  # the image file as sent
    digest: str  # sha256 hex of `data`
    width: int
    height: int


def load_image(url: str, args: ServerArgs, param: str) -> RequestImage:
    """The image a URL names, checked; APIError 400 says what is wrong with it."""
    if DATA_URL.match(url):
        return load_base64_image(url[url.index(",") + 1:], args, param)
    if url.startswith("file://"):
        data = _local_file(url, args, param)
    elif url.startswith(("http://", "https://")):
        raise APIError(400, "this server does not fetch image URLs (it has no network access): send the image "
                            "inline as a data:image/...;base64, URL", param=param)
    else:
        raise APIError(400, "an image URL must be a data:image/...;base64, URL or a file:// URL", param=param)
    return RequestImage(data, hashlib.sha256(data).hexdigest(), *check_image(data, args, param))


def load_base64_image(text: str, args: ServerArgs, param: str) -> RequestImage:
    """An image file sent as base64 (a data URL's payload, LightLLM's `{"type": "base64", "data": ...}`)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image is not valid base64", param=param) from None
    return RequestImage(data, hashlib.sha256(data).hexdigest(), *check_image(data, args, param))


def _local_file(url: str, args: ServerArgs, param: str) -> bytes:
    if not args.allowed_local_media_path:
        raise APIError(400, "file:// image URLs are off: the server was started without "
                            "--allowed_local_media_path", param=param)
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, "a file:// image URL names a file on this machine (file:///path)", param=param)
    root = Path(args.allowed_local_media_path).resolve()
    path = Path(unquote(parsed.path)).resolve()  # symbolic links resolved: no way out of the directory
    if not path.is_relative_to(root):
        raise APIError(400, "the image file is outside the directory --allowed_local_media_path allows",
                       param=param)
    try:
        return path.read_bytes()
    except OSError:
        raise APIError(400, "the image file cannot be read (no such file, or not a file)", param=param) from None


def check_image(data: bytes, args: ServerArgs, param: str) -> tuple[int, int]:
    """The file decodes, whole, as one of FORMATS and within --max_image_pixels; its (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise APIError(400, f"unsupported image format {image.format}; supported: {', '.join(FORMATS)}",
                               param=param)
            width, height = image.size
            if width * height > args.max_image_pixels:  # checked from the header, before decoding the pixels
                raise APIError(400, f"the image has {width}x{height} = {width * height} pixels, more than this "
                                    f"server's --max_image_pixels {args.max_image_pixels}", param=param)
            image.load()  # decodes every pixel: a truncated or corrupt file fails here
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise APIError(400, f"the image could not be decoded: {exc}", param=param) from None
    return width, height


def check_count(count: int, args: ServerArgs, param: str) -> None:
    if count > args.limit_mm_per_prompt:
        raise APIError(400, f"the request has {count} images, more than this server's --limit_mm_per_prompt "
                            f"{args.limit_mm_per_prompt}", param=param)


def layout_text(info: EngineReady, tokenizer, model_name: str, param: str) -> LayoutText:
    """The model's image layout as text (400 for a text-only model)."""
    if info.image_layout is None:
        raise APIError(400, f"model {model_name!r} does not take images (a text-only model)", param=param)
    return info.image_layout.text(tokenizer.convert_ids_to_tokens)


def encode_with_images(state: ServerState, text: str, images: list[RequestImage], encode: Callable[[str], list[int]],
                       param: str) -> tuple[list[int], list[ImageInput]]:
    """The prompt's token ids (`encode`d) with each image marker of `text` expanded into its image's
    placeholder run, in order, and where the runs are. The text must hold exactly one marker per image."""
    if not images:
        return encode(text), []
    names = layout_text(state.engine.info, state.tokenizer, state.model_name, param)
    layout = state.engine.info.image_layout
    pieces = text.split(names.image_text)
    if len(pieces) - 1 != len(images):
        raise APIError(400, f"the prompt text holds {len(pieces) - 1} image markers for {len(images)} images: the "
                            f"text must not contain the model's image marker {names.image_text!r} itself",
                       param=param)
    counts: list[int] = []
    for i, image in enumerate(images):
        try:
            counts.append(layout.tokens_for(image.width, image.height))
        except ValueError as exc:
            raise APIError(400, f"image {i} cannot be taken: {exc}", param=param) from None
    expanded = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        expanded += [names.before, names.placeholder_text * count, names.after, piece]
    ids = encode("".join(expanded))
    runs = [i for i, t in enumerate(ids) if t == layout.placeholder_id]
    if len(runs) != sum(counts):
        raise APIError(400, "the prompt text holds the model's image placeholder token "
                            f"{names.placeholder_text!r} itself", param=param)
    inputs: list[ImageInput] = []
    taken = 0
    for image, count in zip(images, counts):
        start = runs[taken]
        if runs[taken + count - 1] != start + count - 1:  # the run is not contiguous
            raise APIError(400, "an image's placeholder run is broken by the text around it", param=param)
        inputs.append(ImageInput(image.data, image.digest, start, count))
        taken += count
    return ids, inputs
