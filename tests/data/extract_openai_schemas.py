#!/usr/bin/env python3
"""Extract the OpenAI component schemas the tests validate against.

Why: the tests check our responses against OpenAI's own API description, but
the whole document is 3.4 MB and not ours to ship piecemeal by hand.  This
script copies only the named ``#/components/schemas`` entries and every schema
they reference (transitively), and records where they came from, so a plain
clone of the repository can run its tests.  Re-run it when OpenAI publishes a
new version::

    python tests/data/extract_openai_schemas.py path/to/openapi.json

The document is OpenAI's ``openai-openapi`` (https://github.com/openai/openai-openapi),
published under the MIT licence; its notice travels with the extract.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

SOURCE = "https://github.com/openai/openai-openapi (openapi.yaml, as JSON)"
# The document's info.license names MIT; this is the MIT licence's text, as the
# licence requires it to accompany copies (copyright holder: OpenAI; see
# LICENSE in the source repository).
LICENCE = (
    "Copyright (c) OpenAI. "
    "Permission is hereby granted, free of charge, to any person obtaining a "
    "copy of this software and associated documentation files (the "
    '"Software"), to deal in the Software without restriction, including '
    "without limitation the rights to use, copy, modify, merge, publish, "
    "distribute, sublicense, and/or sell copies of the Software, and to permit "
    "persons to whom the Software is furnished to do so, subject to the "
    "following conditions: The above copyright notice and this permission "
    "notice shall be included in all copies or substantial portions of the "
    'Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, '
    "EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF "
    "MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN "
    "NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, "
    "DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR "
    "OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE "
    "USE OR OTHER DEALINGS IN THE SOFTWARE."
)
# The response schemas tests/openai_schema.validate is called with, the
# request schemas tests/test_hostile.py compares its table with, and the
# schemas tests/test_openai_schema.py exercises.
ROOTS = (
    "ChatCompletionResponseMessage",
    "ChatCompletionStreamOptions",
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest",
    "CreateCompletionResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "StopConfiguration",
)
OUT = Path(__file__).with_name("openai-schemas.json")
_REF = re.compile(r"^#/components/schemas/([^/]+)$")


def _refs(node: Any) -> set[str]:
    """Names of the component schemas ``node`` refers to, anywhere inside it."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            match = _REF.match(ref)
            if match is None:
                raise ValueError(f"unsupported $ref {ref!r}")
            found.add(match.group(1))
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def extract(document: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """``roots`` and everything they reference, with provenance."""
    schemas = document["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]  # KeyError: a root or $ref the document lacks
        todo.extend(_refs(keep[name]) - keep.keys())
    info = document["info"]
    return {
        "x-extract": {
            "source": SOURCE,
            "title": info.get("title"),
            "version": info["version"],
            "openapi": document.get("openapi"),
            "extracted": datetime.date.today().isoformat(),
            "by": "tests/data/extract_openai_schemas.py",
            "roots": sorted(roots),
            "license": info.get("license"),
            "licence": LICENCE,
        },
        "components": {"schemas": dict(sorted(keep.items()))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("document", type=Path, help="OpenAI's openapi JSON file")
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    document = json.loads(args.document.read_text(encoding="utf-8"))
    result = extract(document, ROOTS)
    text = json.dumps(result, indent=1, ensure_ascii=False, sort_keys=False)
    args.output.write_text(text + "\n", encoding="utf-8")
    count = len(result["components"]["schemas"])
    version = result["x-extract"]["version"]
    print(f"{args.output}: {count} schemas from version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
