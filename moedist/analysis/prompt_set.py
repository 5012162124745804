"""Builds the prompt set shipped with moedist (moedist/analysis/prompts.jsonl) from text
that exists wherever Python does: the standard library's own source.

Tasks (each a different kind of text, so a router can tell them apart or not):
  code        function bodies with docstrings and comments removed
  docstring   English prose from docstrings
  comment     blocks of '#' comments
  arithmetic  sums and products written out in words (generated, exact)

Each line is {"task", "text", "split"}; split "signature" rows (24 per task) make the
signatures, "heldout" rows (16 per task, from other files) are for evaluating expert
pre-selection on text the signature never saw. Deterministic for a given stdlib.

    python -m moedist.analysis.prompt_set --out moedist/analysis/prompts.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import zlib
from pathlib import Path

from moedist.data.corpus import stdlib_documents

MAX_CHARS = 320
PER_TASK = {"signature": 24, "heldout": 16}
TASKS = ("code", "docstring", "comment", "arithmetic")

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]  # fmt: skip
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0]


def _from_source(source: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"code": [], "docstring": [], "comment": []}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return out
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 160 and doc.count(" ") > 20:
                out["docstring"].append(_clip(" ".join(doc.split())))
        if isinstance(node, ast.FunctionDef) and node.end_lineno and node.end_lineno - node.lineno >= 6:
            body = node.body[1:] if ast.get_docstring(node) else node.body
            if not body:
                continue
            seg = lines[body[0].lineno - 1 : node.end_lineno]
            code = [ln for ln in seg if ln.strip() and not ln.strip().startswith("#")]
            text = "\n".join(ln.split("  #")[0].rstrip() for ln in code)
            if len(text) >= 160:
                out["code"].append(_clip(text))
    block: list[str] = []
    for ln in [*lines, ""]:
        s = ln.strip()
        if s.startswith("#") and not s.startswith("#!") and "coding" not in s:
            block.append(s.lstrip("#").strip())
        else:
            text = " ".join(b for b in block if b)
            if len(block) >= 3 and len(text) >= 140 and text.count(" ") > 15:
                out["comment"].append(_clip(text))
            block = []
    return out


def _arithmetic(rng: random.Random) -> str:
    parts = []
    while sum(len(p) for p in parts) < 220:
        a, b = rng.randrange(2, 1000), rng.randrange(2, 1000)
        if rng.random() < 0.5:
            parts.append(f"{number_words(a)} plus {number_words(b)} equals {number_words(a + b)}.")
        else:
            a, b = rng.randrange(2, 100), rng.randrange(2, 100)
            parts.append(f"{number_words(a)} times {number_words(b)} is {number_words(a * b)}.")
    return _clip(" ".join(parts))


def build_prompts(seed: int = 0) -> list[dict[str, str]]:
    """The prompt set: PER_TASK rows of each task and split."""
    rng = random.Random(seed)
    pools: dict[str, dict[str, list[str]]] = {"signature": {}, "heldout": {}}
    for doc in stdlib_documents():
        if "/test" in f"/{doc.name}" or "idlelib" in doc.name:
            continue  # test suites and the IDE are full of near-duplicates
        # files go to one split or the other (a stable hash of the path)
        split = "heldout" if zlib.crc32(doc.name.encode()) % 3 == 0 else "signature"
        for task, texts in _from_source(doc.text).items():
            pools[split].setdefault(task, []).extend(texts)
    rows = []
    for split, n in PER_TASK.items():
        for task in TASKS:
            if task == "arithmetic":
                texts = [_arithmetic(rng) for _ in range(n)]
            else:
                cands = sorted(set(pools[split].get(task, [])))
                if len(cands) < n:
                    raise RuntimeError(f"only {len(cands)} {task} texts in the stdlib for split {split}")
                texts = rng.sample(cands, n)
            rows += [{"task": task, "text": t, "split": split} for t in texts]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Build moedist's shipped prompt set from the standard library.")
    ap.add_argument("--out", default=str(Path(__file__).with_name("prompts.jsonl")))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = build_prompts(args.seed)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
