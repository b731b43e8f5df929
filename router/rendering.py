"""Answers the router makes from the replica's, where backends differ from OpenAI's API
(`Context.render`, applied to a buffered 2xx answer):

- transcriptions in `text`, `srt` and `vtt` from the replica's `verbose_json`
  (which the router asks for instead): the text alone, SubRip and WebVTT subtitles,
  each `text/plain` (vox-box answers those with a JSON string);
- images as `url` from the replica's `b64_json` (sd-server serves no URLs): a `data:` URL
  holding the image, so that the router keeps no image after the answer.
"""

from __future__ import annotations

from typing import Any

import orjson

TEXT_PLAIN = b"text/plain; charset=utf-8"
TRANSCRIPT_FORMATS = (b"text", b"srt", b"vtt")
"""Transcript formats the router makes from verbose_json (backends differ on them:
vox-box answers each with a JSON string)."""


def _object(body: bytes) -> dict[str, Any] | None:
    """The replica's answer as a JSON object, or None."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _stamp(seconds: float, comma: bool) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{',' if comma else '.'}{millis:03d}"


def _segments(doc: dict[str, Any]) -> list[tuple[float, float, str]]:
    out = []
    for seg in doc.get("segments") or []:
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            start, end = seg.get("start", 0), seg.get("end", 0)
            if isinstance(start, int | float) and isinstance(end, int | float):
                out.append((float(start), float(end), seg["text"].strip()))
    if not out:  # no segments: the whole text as one cue
        duration = doc.get("duration")
        out.append((0.0, float(duration) if isinstance(duration, int | float) else 0.0,
                    str(doc.get("text", "")).strip()))
    return out


def transcript(wanted: bytes, body: bytes) -> tuple[bytes, bytes] | None:
    """(body, content type) of the transcript in `wanted` (`text`, `srt`, `vtt`) from a
    verbose_json answer; None when `body` is not one (it is passed on as it is)."""
    doc = _object(body)
    if doc is None or not isinstance(doc.get("text"), str):
        return None
    if wanted == b"text":
        return doc["text"].strip().encode() + b"\n", TEXT_PLAIN
    vtt = wanted == b"vtt"
    cues = [f"{_stamp(start, not vtt)} --> {_stamp(end, not vtt)}\n{text}\n"
            for start, end, text in _segments(doc)]
    if vtt:
        return ("WEBVTT\n\n" + "\n".join(cues)).encode(), TEXT_PLAIN
    return "\n".join(f"{n}\n{cue}" for n, cue in enumerate(cues, 1)).encode(), TEXT_PLAIN


# base64 openings of the image formats a backend may answer with
_IMAGE_TYPES = {"iVBORw0KGgo": "image/png", "/9j/": "image/jpeg", "UklGR": "image/webp"}


def image_urls(body: bytes) -> tuple[bytes, bytes] | None:
    """The images answer with each `b64_json` as a `data:` URL in `url`; None when `body`
    is not an images answer."""
    doc = _object(body)
    if doc is None or not isinstance(doc.get("data"), list):
        return None
    for item in doc["data"]:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            data = item.pop("b64_json")
            kind = next((t for head, t in _IMAGE_TYPES.items() if data.startswith(head)),
                        "image/png")
            item["url"] = f"data:{kind};base64,{data}"
    return orjson.dumps(doc), b"application/json"
