"""README.rst's examples, run as written against Gemma 3 270M.

The literal blocks of the "Use it" section are read from README.rst itself,
so the examples a newcomer copies are the ones tested: only the port is
substituted (and, in the config file, the model's path).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, LiveServer

ADDRESS = "127.0.0.1:8000"


def section(title: str) -> str:
    """The text of README.rst's section *title*, up to the next section."""
    text = (REPO / "README.rst").read_text("utf-8")
    match = re.search(
        rf"^{re.escape(title)}\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", text, re.M | re.S
    )
    assert match, f"no section {title!r} in README.rst"
    return match.group(1)


def literal_blocks(text: str) -> list[str]:
    """reST literal blocks: the indented lines after a paragraph ending "::"."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        block = textwrap.dedent("\n".join(body)).strip("\n")
        if block:
            blocks.append(block + "\n")
    return blocks


def examples() -> dict[str, list[str]]:
    """The "Use it" blocks by kind: curl commands, Python, config files."""
    kinds: dict[str, list[str]] = {"curl": [], "python": [], "config": []}
    for block in literal_blocks(section("Use it")):
        if block.startswith("curl "):
            kinds["curl"].append(block)
        elif block.startswith("from openai import"):
            kinds["python"].append(block)
        elif block.startswith("models:"):
            kinds["config"].append(block)
        else:
            raise AssertionError(f"an example of no known kind:\n{block}")
    return kinds


def test_examples_are_found() -> None:
    """The parser finds what the tests below run; each names the address."""
    found = examples()
    assert [len(found[k]) for k in ("curl", "python", "config")] == [1, 2, 1]
    for block in found["curl"] + found["python"]:
        assert ADDRESS in block, block
    # The first client example is a completion: a base model answers it.
    assert "client.completions.create(" in found["python"][0]
    assert "chat.completions" in found["python"][1]


def run(command: list[str]) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def with_port(block: str, live: LiveServer) -> str:
    return block.replace(ADDRESS, f"127.0.0.1:{live.port}")


@pytest.fixture(scope="module")
def default_server(start_server: Callable[..., LiveServer]) -> LiveServer:
    """What the quickstart serves: no model configured, so Gemma 3 270M."""
    return start_server(LLAMA_MODEL="")


@pytest.mark.gemma
def test_curl_example_streams_text(default_server: LiveServer) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (block,) = examples()["curl"]
    output = run(["bash", "-c", with_port(block, default_server)])
    events = [
        json.loads(line.removeprefix("data: "))
        for line in output.splitlines()
        if line.startswith("data: {")
    ]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text.strip(), output
    assert output.rstrip().endswith("data: [DONE]"), output[-300:]


@pytest.mark.gemma
def test_first_client_example_prints_text(default_server: LiveServer) -> None:
    block = examples()["python"][0]
    output = run([sys.executable, "-c", with_port(block, default_server)])
    assert output.strip(), repr(output)


@pytest.mark.gemma
def test_chat_example_prints_text_with_the_readme_config(
    start_server: Callable[..., LiveServer],
    gemma_model: Path,
    tmp_path: Path,
) -> None:
    (config,) = examples()["config"]
    assert "/path/to/gemma-3-270m-q4_k_m.gguf" in config
    chat_yaml = tmp_path / "chat.yaml"
    chat_yaml.write_text(
        config.replace("/path/to/gemma-3-270m-q4_k_m.gguf", str(gemma_model))
    )
    live = start_server(LLAMA_MODEL="", LLAMA_CONFIG_FILE=str(chat_yaml))
    block = examples()["python"][1]
    output = run([sys.executable, "-c", with_port(block, live)])
    assert output.strip(), repr(output)


def test_robustness_report_names_tests_that_exist() -> None:
    """Every row of the report names a test, and every test it names exists."""
    report = section("Robustness report")
    rows = report.split("\n   * - ")[2:]  # after the header row
    assert len(rows) >= 15, rows
    for row in rows:
        assert "::test_" in row, f"a row without a test: {row[:200]}"
    current = None
    names = re.findall(r"``(tests/\w+\.py)?::(test_\w+)``", report)
    assert names
    for path, name in names:
        current = path or current
        assert current is not None, name
        source = (REPO / current).read_text("utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"{current}::{name}"


def test_robustness_figures_name_their_command() -> None:
    """Each resource figure in the report names the benchmark run behind it."""
    rows = section("Robustness report").split("\n   * - ")[2:]
    with_figures = 0
    for row in rows:
        _tried, outcome, _where = row.split("\n     - ")
        if re.search(r"MB|p95", outcome):
            with_figures += 1
            command = r"``[^`]*benchmarks/\w+\.py\s+--[^`]*``"
            assert re.search(command, outcome), outcome
    assert with_figures >= 2


def test_every_error_code_the_readme_names_is_asserted() -> None:
    """Each ``code`` README.rst names is checked by some test, by its value."""
    readme = (REPO / "README.rst").read_text("utf-8")
    sources = "\n".join(
        p.read_text("utf-8") for p in (REPO / "wsgi_llama").rglob("*.py")
    )
    codes = set(re.findall(r'code=\(?"([a-z_]+)"', sources))
    named = {code for code in codes if f"``{code}``" in readme}
    assert {"invalid_json", "invalid_token_id", "queue_full"} <= named, named
    tests = "\n".join(p.read_text("utf-8") for p in (REPO / "tests").glob("test_*.py"))
    for code in named:
        asserted = rf'(==\s*"{code}"|code="{code}")'
        assert re.search(asserted, tests), code
