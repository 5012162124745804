"""Every command the README shows runs as written, and every relative link in the docs resolves.

The commands come from the README's ```bash blocks. The short ones run here, in README
order, in a temporary folder holding the inputs they name (notes/, books.parquet, my.toml,
mine.jsonl): `moedist` and `.venv/bin/moedist` become a call of `moedist.cli.main` (the
console script's entry point) with the command's words, in the interpreter running the
tests, so the code under test is this tree's. The ones that are long
or start Ray or a cluster are listed in NOT_RUN with the reason. A README command that is
in neither fails the test, and so does a NOT_RUN entry the README no longer shows, so a new
command cannot slip through untested.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# command (as shown, comments stripped) -> why this test does not run it
NOT_RUN = {
    "make run": "the set-up plus a 300-step run (about a minute); `moedist train` is run below",
    "make test": "the whole suite, this test included",
    "source .venv/bin/activate": "environment set-up; here moedist runs under the test's own interpreter",
    "moedist train --router tc --steps 500 --seed 1": "500 steps",
    "moedist train --preset fine": "300 steps of a 64-expert model",
    "moedist train --workers 4 --steps 100 --out runs/ep4": "starts Ray; tests/e2e/test_cli.py trains with --workers 2",
    "moedist train --resume runs/ep4 --workers 2 --steps 200": "needs runs/ep4 (Ray)",
    "cluster/local up --nodes 2 --cpus-per-node 2": "starts a 2-node Ray cluster; tests/distributed/test_multinode.py",
    "moedist train --address auto --workers 4 --placement SPREAD --steps 100 --out runs/two-nodes": "needs the cluster",
    "cluster/local add-node": "needs the cluster; tests/distributed/test_cluster_local.py",
    "cluster/local remove-node": "needs the cluster; tests/distributed/test_cluster_local.py",
    "cluster/local down": "stops the cluster `cluster/local up` started",
    "moedist train --steps 2000 --out runs/long": "2000 steps; tests/e2e/test_control_cli.py runs a job to control",
    "moedist ctl --run runs/long status": "needs a running job: tests/e2e/test_control_cli.py",
    "moedist ctl --run runs/long metrics --follow": "needs a running job: tests/e2e/test_control_cli.py",
    "moedist ctl --run runs/long checkpoint": "needs a running job: tests/e2e/test_control_cli.py",
    "moedist ctl --run runs/long stop": "needs a running job: tests/e2e/test_control_cli.py",
}  # fmt: skip

# Relative links whose target another branch adds (remove each entry once it is merged).
PENDING_LINKS: dict[str, str] = {}

MOEDIST = ("moedist", ".venv/bin/moedist")


def normalise(command: str) -> str:
    """One spelling per command: shell words re-joined, comments and extra spaces gone."""
    return shlex.join(shlex.split(command, comments=True))


def fenced_blocks(text: str, lang: str) -> list[str]:
    """Bodies of the ```lang code blocks of a Markdown text, in order."""
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, in order (continuation lines joined)."""
    out = []
    for block in fenced_blocks(README.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                out.append(normalise(line))
    return out


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    assert commands, "no ```bash block found in README.md"
    not_run = {normalise(c) for c in NOT_RUN}
    for c in commands:
        if c in not_run:
            continue
        words = shlex.split(c)
        assert words[0] in MOEDIST, (
            f"README command {c!r} is neither a moedist command this test can run nor in NOT_RUN; "
            "run it here or list it in NOT_RUN with the reason"
        )
        assert not set(words) & {";", "&&", "||", "|", ">", "<"}, f"{c!r}: one plain command per line, please"
    stale = not_run - set(commands)
    assert not stale, f"NOT_RUN lists commands the README no longer shows: {sorted(stale)}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with the inputs the README's commands name."""
    from moedist.data.corpus import stdlib_documents

    docs = [d for d in stdlib_documents() if len(d.text) > 4000][:60]  # real text, several KB each
    notes = tmp_path / "notes"
    notes.mkdir()
    for i, d in enumerate(docs[:40]):
        (notes / f"{i:02d}-{Path(d.name).stem}.txt").write_text(d.text)
    pq.write_table(pa.table({"text": [d.text for d in docs[40:]]}), tmp_path / "books.parquet")
    toml = fenced_blocks(README.read_text(), "toml")
    assert len(toml) == 1, "README.md should show exactly one TOML example (my.toml)"
    (tmp_path / "my.toml").write_text(toml[0])
    prompts = [{"task": "code", "text": f"def f{i}(x):\n    return x * {i} + 1\n"} for i in range(4)]
    prompts += [{"task": "prose", "text": f"The {w} sat on the mat and looked out of the window."}
                for w in ("cat", "dog", "bird", "fox")]  # fmt: skip
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return tmp_path


@pytest.fixture
def one_thread():
    """torch and numba on one thread for the commands run here: on a 2-core machine shared
    with other test processes, two spinning OpenMP threads per process made this test 3-4x
    slower (283 s against 78 s measured). The commands' results do not depend on it."""
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def test_readme_commands_run_as_written(workdir: Path, one_thread, monkeypatch, capsys):
    from moedist.cli import main

    monkeypatch.chdir(workdir)
    not_run = {normalise(c) for c in NOT_RUN}
    ran = []
    for c in readme_commands():
        if c in not_run:
            continue
        words = shlex.split(c)
        try:  # what the console script does with these words
            status = main(words[1:])
        except SystemExit as e:  # argparse: --help exits 0, a bad flag 2
            status = e.code
        out = capsys.readouterr()
        assert status == 0, f"`{c}` exited with {status}:\n{out.err[-3000:]}"
        if words[1] == "eval":
            res = json.loads(out.out.strip().splitlines()[-1])
            assert 0 < res["val_loss"] < 6, res
        if words[1] == "generate":
            assert out.out.startswith(words[words.index("--prompt") + 1]), out.out
        ran.append(c)
    assert any(shlex.split(c)[1] == "train" for c in ran), "no README training command ran"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)  # headings only outside code
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?)\s*$", text, flags=re.M)}


def test_relative_links_in_readme_and_docs_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.is_relative_to(ROOT):
                bad.append(f"{page.name}: {target} points outside the repository")
            elif not dest.exists():
                if rel not in PENDING_LINKS:
                    bad.append(f"{page.name}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)
