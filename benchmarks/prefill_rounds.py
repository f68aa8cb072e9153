"""Prefill of a ~1.6k-token prompt, wsgi-llama against llama.cpp's server,
both started afresh every round.

Prints figures; it is not a test. ``compare.py`` starts each server once, but
the speed of one process differs from the next by a few per cent for the same
work (the same library, parameters and KV cache layout, measured here), so a
difference this small needs several processes of each::

    LLAMA_SERVER_BIN=.../llama-server python benchmarks/prefill_rounds.py \\
        [--rounds 6] [--per-round 4] [--model PATH] [--json out.json]

Each round starts both servers, warms each with one prompt, then sends
*per-round* fresh prompts to each in turn (the order alternating) and takes
the median of the paired ratios wsgi-llama / llama.cpp. Printed: every
round's medians and ratio, then the median and mean of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare


def one_round(
    model: Path, binary: Path, prompts: compare.Prompts, per: int, logs: Path, n: int
) -> dict[str, list[float]]:
    names = ["wsgi-llama", "llama.cpp"] if n % 2 == 0 else ["llama.cpp", "wsgi-llama"]
    servers: dict[str, Any] = {}
    try:
        for name in names:
            if name == "wsgi-llama":
                servers[name] = compare.WsgiLlama(model, logs / "wsgi-llama.log")
            else:
                servers[name] = compare.LlamaCppServer(
                    binary, model, logs / "llama.cpp.log", 4
                )
        times: dict[str, list[float]] = {name: [] for name in names}
        with httpx.Client(timeout=300) as client:
            for server in servers.values():
                compare.stream(client, server.url, prompts.long(1600), 1)
            for i in range(per):
                for name in names if i % 2 == 0 else names[::-1]:
                    time.sleep(0.5)
                    result = compare.stream(
                        client, servers[name].url, prompts.long(1600), 1
                    )
                    times[name].append(result["ttft"])
        return times
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: Gemma)")
    parser.add_argument(
        "--llama-server-bin",
        type=Path,
        default=os.environ.get("LLAMA_SERVER_BIN") or None,
        help="llama.cpp's llama-server (default: $LLAMA_SERVER_BIN)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.llama_server_bin is None:
        parser.error("name llama.cpp's server: --llama-server-bin or LLAMA_SERVER_BIN")
    model = (args.model or compare.default_model()).resolve()
    prompts = compare.Prompts(model)
    ratios: list[float] = []
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            times = one_round(
                model, args.llama_server_bin, prompts, args.per_round, Path(tmp), n
            )
            ours, theirs = times["wsgi-llama"], times["llama.cpp"]
            ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
            ratios.append(ratio)
            rounds.append({"wsgi-llama": ours, "llama.cpp": theirs, "ratio": ratio})
            print(
                f"round {n + 1}: wsgi-llama {statistics.median(ours):.3f} s, "
                f"llama.cpp {statistics.median(theirs):.3f} s, "
                f"paired ratio {ratio:.3f}",
                flush=True,
            )
    prompts.close()
    print(
        f"prefill, wsgi-llama / llama.cpp over {len(ratios)} rounds: "
        f"median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}, "
        f"range {min(ratios):.3f}-{max(ratios):.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
