"""Transcriptions in `text`, `srt` and `vtt`, made by the router from the replica's
`verbose_json` answer (`router.multipart` asks for it instead), so that every speech-to-text
backend answers those formats as OpenAI's API does: the text alone, SubRip and WebVTT
subtitles, each `text/plain`."""

from __future__ import annotations

from typing import Any

import orjson

TEXT_PLAIN = b"text/plain; charset=utf-8"


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


def render(wanted: bytes, body: bytes) -> tuple[bytes, bytes] | None:
    """(body, content type) of the transcript in `wanted` (`text`, `srt`, `vtt`) from a
    verbose_json answer; None when `body` is not one (it is passed on as it is)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        return None
    if wanted == b"text":
        return doc["text"].strip().encode() + b"\n", TEXT_PLAIN
    vtt = wanted == b"vtt"
    cues = [f"{_stamp(start, not vtt)} --> {_stamp(end, not vtt)}\n{text}\n"
            for start, end, text in _segments(doc)]
    if vtt:
        return ("WEBVTT\n\n" + "\n".join(cues)).encode(), TEXT_PLAIN
    return "\n".join(f"{n}\n{cue}" for n, cue in enumerate(cues, 1)).encode(), TEXT_PLAIN
