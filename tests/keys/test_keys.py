"""`stack keys create|list|revoke` on a copy of the root stack.toml, through `stack.cli.run`."""

from __future__ import annotations

import difflib
import json
import shutil
from datetime import date
from pathlib import Path

import pytest

from stack.cli import run
from stack.config import load
from stack.secrets import hash_key

ROOT = Path(__file__).resolve().parents[2]

COMMENTED = """\
# A fleet.
[stack]
name = "lab"   # trailing comment

[models.qwen]
source = "hf://Qwen/Qwen2.5-7B-Instruct"
aliases = ["chat"]

[router]
listen = "0.0.0.0:8080"

# The keys: hashes only.
[[keys]]
name = "ops"
hash = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"

# Models below the keys on purpose.
[models.llama]
source = "hf://meta-llama/Llama-3.1-8B-Instruct"
"""


@pytest.fixture()
def stack_file(tmp_path: Path) -> Path:
    path = tmp_path / "stack.toml"
    shutil.copy(ROOT / "stack.toml", path)
    return path


def _only_insertions(before: str, after: str) -> str:
    """The inserted text; fails if anything of `before` changed."""
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    inserted = ""
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        assert tag in ("equal", "insert"), (tag, before[i1:i2], after[j1:j2])
        if tag == "insert":
            inserted += after[j1:j2]
    return inserted


def test_create_prints_the_key_once_and_stores_only_its_hash(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = stack_file.read_text()
    code = run(["keys", "create", "alice", "-f", str(stack_file), "--models", "gemma",
                 "--owner", "alice@example.com", "--rpm", "60", "--tpm", "10000",
                 "--expires", "2099-12-31"])
    assert code == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("sk-") and len(key) > 40
    assert "shown only this once" in out.err
    after = stack_file.read_text()
    assert key not in after
    added = _only_insertions(before, after)
    assert added == (
        '\n[[keys]]\nname = "alice"\n'
        f'hash = "{hash_key(key)}"\n'
        'owner = "alice@example.com"\nmodels = ["gemma"]\nrpm = 60\ntpm = 10000\n'
        "expires = 2099-12-31\n"
    )
    spec = load(stack_file)
    assert [(k.name, k.models, k.rpm, k.tpm, k.expires) for k in spec.keys] == [
        ("alice", ["gemma"], 60, 10000, date(2099, 12, 31))
    ]


def test_create_keeps_comments_and_adds_after_the_last_key(tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(COMMENTED)
    assert run(["keys", "create", "ci", "-f", str(path), "--models", "chat,llama"]) == 0
    after = path.read_text()
    added = _only_insertions(COMMENTED, after)
    assert added.strip().startswith('[[keys]]\nname = "ci"\nhash = "sha256:')
    assert '"\n\n[[keys]]\nname = "ci"' in after  # a blank line after the previous key
    assert after.index('name = "ci"') < after.index("# Models below the keys")
    assert [k.name for k in load(path).keys] == ["ops", "ci"]


def test_create_refuses_a_duplicate_name(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["keys", "create", "bob", "-f", str(stack_file)]) == 0
    before = stack_file.read_text()
    capsys.readouterr()
    assert run(["keys", "create", "bob", "-f", str(stack_file)]) == 1
    err = capsys.readouterr().err
    assert err == ("error: a key named `bob` already exists in stack.toml\n"
                   "hint: choose another name, or `stack keys revoke bob` first.\n")
    assert stack_file.read_text() == before


@pytest.mark.parametrize(("argv", "message"), [
    (["--models", "gema"], "error: `--models`: `gema` is not a model in stack.toml\n"
                           "hint: did you mean `gemma`?\n"),
    (["--expires", "2001-01-01"], "error: `--expires` 2001-01-01 is in the past\n"
                                  "hint: give the last day the key should work.\n"),
    (["--expires", "soon"], "error: `--expires` must be a date YYYY-MM-DD, got `soon`\n"
                            "hint: e.g. `--expires 2027-01-31` (the last day the key works).\n"),
    (["--rpm", "0"], "error: `--rpm` must be at least 1, got 0\n"
                     "hint: leave `--rpm` out for no limit.\n"),
])
def test_create_rejects_bad_flags_and_leaves_the_file(
    stack_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = stack_file.read_text()
    assert run(["keys", "create", "x", "-f", str(stack_file), *argv]) == 1
    assert capsys.readouterr().err == message
    assert stack_file.read_text() == before


def test_list_shows_limits_and_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(COMMENTED + '\n[[keys]]\nname = "old"\nowner = "bo"\nmodels = ["qwen"]\n'
                    "rpm = 5\nexpires = 2001-01-01\n"
                    'hash = "sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8'
                    'fb9"\n')
    assert run(["keys", "list", "-f", str(path)]) == 0
    assert capsys.readouterr().out == (
        "name  owner  user  models  rpm  tpm  expires     expired\n"
        "ops   -      -     all     -    -    -           no\n"
        "old   bo     -     qwen    5    -    2001-01-01  yes\n"
    )
    assert run(["keys", "list", "--json", "-f", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1] == {"name": "old", "owner": "bo", "user": None, "models": ["qwen"], "rpm": 5,
                       "tpm": None, "expires": "2001-01-01", "expired": True}
    assert "hash" not in rows[0]


def test_revoke_removes_only_that_key(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = stack_file.read_text()
    assert run(["keys", "create", "a", "-f", str(stack_file)]) == 0
    with_a = stack_file.read_text()
    assert run(["keys", "create", "b", "-f", str(stack_file)]) == 0
    assert run(["keys", "revoke", "b", "-f", str(stack_file)]) == 0
    assert stack_file.read_text() == with_a
    assert run(["keys", "revoke", "a", "-f", str(stack_file)]) == 0
    assert stack_file.read_text() == original


def test_revoke_in_the_middle_keeps_the_rest_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(COMMENTED)
    assert run(["keys", "create", "ci", "-f", str(path)]) == 0
    with_ci = path.read_text()
    assert run(["keys", "revoke", "ops", "-f", str(path)]) == 0
    ops_table = (
        '[[keys]]\nname = "ops"\n'
        'hash = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"\n'
    )
    assert path.read_text() == with_ci.replace(ops_table, "", 1)
    assert "# The keys: hashes only.\n" in path.read_text()
    assert [k.name for k in load(path).keys] == ["ci"]


def test_revoke_refuses_to_leave_a_public_router_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(COMMENTED)
    assert run(["keys", "revoke", "ops", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: revoking `ops` would leave stack.toml invalid: "
                          "`router.listen` is `0.0.0.0:8080`, not a loopback address")
    assert path.read_text() == COMMENTED


def test_revoke_an_unknown_key(stack_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["keys", "revoke", "zed", "-f", str(stack_file)]) == 1
    assert capsys.readouterr().err == ("error: no key named `zed` in stack.toml\n"
                                       "hint: `stack keys list` shows the keys: there are "
                                       "none.\n")
