"""`stack validate`, `stack schema` and `stack init`, through `stack.cli.run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gevent import monkey

from stack.cli import run
from stack.commands.init import starter_files
from stack.commands.schema import render_markdown
from stack.config import load, node_settings

ROOT = Path(__file__).resolve().parents[2]


def test_root_stack_toml_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["validate", "-f", str(ROOT / "stack.toml")]) == 0
    assert capsys.readouterr().out == "stack.toml is valid: 1 model, 1 host\n"
    # `run` leaves the process as it was: only the console script's `main` patches gevent
    assert not monkey.is_module_patched("socket")
    spec = load(ROOT / "stack.toml")
    assert spec.router.listen == "127.0.0.1:8080" and not spec.keys
    assert spec.hosts["local"].address == "@local"
    assert node_settings(spec, "local").cpu_inference
    gemma = spec.models["gemma"]
    assert (gemma.source, gemma.backend, gemma.context) == (
        "local://models/gemma-3-270m-q4_k_m.gguf", "llama.cpp", 2048)
    assert not spec.runtimes  # the runtime catalogue builds llama.cpp


def test_validate_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text('[models.q]\nsource = "/m"\nreplicas = 0\n\n[router]\nlisten = ":80"\n')
    assert run(["validate", "-f", str(path)]) == 1
    assert capsys.readouterr().err == (
        "error: `models.q.replicas` must be at least 1, got 0 (stack.toml:3:12)\n"
        "hint: remove the model to stop it, or set `replicas = 1`.\n"
    )
    path.write_text('[models.q]\nsource = "/m"\n\n[router]\nlisten = ":80"\n'
                    'hosts = ["x"]\n\n[hosts.a]\naddress = "a"\n')
    assert run(["validate", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 2
    assert err.index("`router.listen`") < err.index("`router.hosts[0]`")


def test_validate_names_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["validate", "-f", str(tmp_path / "nope.toml")]) == 1
    assert capsys.readouterr().err == (
        f"error: `{tmp_path / 'nope.toml'}` does not exist\n"
        "hint: run `stack init` to write a starter stack.toml, or pass `-f FILE`.\n"
    )


def test_validate_checks_the_inventory_file_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text('[stack]\ninventory = "inventories/lab.py"\n')
    assert run(["validate", "-f", str(path)]) == 1
    assert "`stack.inventory` names `inventories/lab.py`, which does not exist " \
        "(stack.toml:2:13)" in capsys.readouterr().err
    (tmp_path / "inventories").mkdir()
    (tmp_path / "inventories" / "lab.py").write_text('hosts = ["@local"]\n')
    assert run(["validate", "-f", str(path)]) == 0
    assert capsys.readouterr().out == \
        "stack.toml is valid: 0 models, hosts from `inventories/lab.py`\n"


def test_init_writes_a_starter_that_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "My Lab"
    assert run(["init", str(target)]) == 0
    assert (target / "inventories" / "example.py").is_file()
    assert ".stack/" in (target / ".gitignore").read_text().splitlines()  # the secret's folder
    assert run(["validate", "-f", str(target / "stack.toml")]) == 0
    assert capsys.readouterr().out.endswith(
        "stack.toml is valid: 1 model, hosts from `inventories/local.py`\n")
    assert load(target / "stack.toml").stack.name == "my-lab"
    assert "#" in (target / "stack.toml").read_text()  # commented
    for inventory in ("local.py", "example.py"):  # the inventories are real Python
        compile((target / "inventories" / inventory).read_text(), inventory, "exec")


def test_init_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "inventories").mkdir()
    (tmp_path / "inventories" / "local.py").write_text("# mine\n")
    assert run(["init", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: `{tmp_path / 'inventories' / 'local.py'}` already exists; `stack init` "
        "never overwrites\nhint: run it in an empty folder, or move the existing files away.\n"
    )
    assert not (tmp_path / "stack.toml").exists()
    assert (tmp_path / "inventories" / "local.py").read_text() == "# mine\n"


def test_root_local_inventory_is_the_starter_one() -> None:
    starter = starter_files("x")[Path("inventories") / "local.py"]
    assert (ROOT / "inventories" / "local.py").read_text() == starter


def test_schema_prints_a_json_schema_editors_can_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "stack.toml"
    assert schema["additionalProperties"] is False
    node = schema["$defs"]["NodeSpec"]["properties"]
    size_pattern = node["reserved_vram"]["anyOf"][1]["pattern"]
    assert re.match(size_pattern, "24GiB") and not re.match(size_pattern, "24 gigs")
    model = schema["$defs"]["ModelSpec"]
    assert model["required"] == ["source"]
    assert model["properties"]["replicas"]["minimum"] == 1


def test_reference_doc_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "stack-toml.md").read_text()
    assert committed == render_markdown() + "\n", \
        "run `stack schema --markdown > docs/stack-toml.md`"


def test_reference_documents_every_section() -> None:
    text = render_markdown()
    for header in ("[stack]", "[hosts.NAME]", '[nodes."PATTERN"]',
                   '[nodes."PATTERN".drivers.VENDOR]', "[runtimes.NAME]", "[models.NAME]",
                   "[models.NAME.gpu]", "[models.NAME.pin]", "[router]", "[router.timeouts]",
                   "[[keys]]"):
        assert f"## `{header}`" in text
    assert '| `reserved_vram` | size such as "24GiB" or a number of bytes | `0` |' in text


def test_validate_reads_a_file_that_starts_with_a_byte_order_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.toml"
    path.write_bytes(b'\xef\xbb\xbf[stack]\nname = "lab"\n')
    assert run(["validate", "-f", str(path)]) == 0
    assert capsys.readouterr().out == "stack.toml is valid: 0 models, 0 hosts\n"
