"""`router.usage.find_usage`: the usage object of an answer found without parsing it all."""

from __future__ import annotations

from router.usage import find_usage


def test_the_last_usage_object_is_found_with_nested_objects_inside() -> None:
    body = (b'{"usage": {"prompt_tokens": 1}, "choices": [], "usage" : {"prompt_tokens": 10,'
            b' "details": {"cached": {"n": 0}}, "completion_tokens": 5}}')
    assert find_usage(body) == {"prompt_tokens": 10, "details": {"cached": {"n": 0}},
                                "completion_tokens": 5}


def test_no_object_when_it_does_not_end_within_4_kib_or_is_no_json() -> None:
    assert find_usage(b'{"usage": {"a": "' + b"x" * 5000 + b'"}}') is None
    assert find_usage(b'{"usage": {"a": {"b": 1}') is None
    assert find_usage(b'{"usage": {"a": 1,}}') is None
    assert find_usage(b'{"usage": null}') is None
    assert find_usage(b'{"choices": []}') is None
