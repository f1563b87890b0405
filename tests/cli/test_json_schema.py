"""`run --json-schema FILE` (issue 19): the answer is JSON of the schema; a file that cannot be read, is not
JSON or is not a schema the grammar engine enforces is one error line before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from test_hardening_cli import SMALL, assert_one_line_error, cli, reuse_engines  # noqa: F401 (a fixture)

from qwen35_lite.convert.synthetic import write_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    return write_checkpoint(module_tmp("schema") / "tiny", SMALL, dtype=torch.float32)


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "no such file"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "frobnicate"}', "cannot be enforced"),
    ],
)
def test_a_bad_schema_file_is_one_error_line_before_the_load(tmp_path, content, words):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    # the model does not exist: the schema is refused before anything looks for it
    r = cli("run", "-m", tmp_path / "no-model", "--json-schema", path, "hi")
    assert_one_line_error(r, words, code=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_run_answers_json_of_the_schema(ckpt, tmp_path, seed):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    args = ["--json", "--no-think", "-t", "1", "--seed", seed, "-n", "30", "--json-schema", path]
    r = cli("run", "-m", ckpt, *args, "Give me JSON")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
