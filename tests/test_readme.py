"""Every command and snippet of README.md runs as written (issue 21 item 1), so the README cannot drift.

The test extracts every fenced code block and every indented command of README.md. In a temporary
folder holding a copy of the configs and tiny files at the paths the configs and commands name
(data/multi30k, my.txt, reviews.txt, a.png, ...), it runs the shell commands in README order through
``bash -c`` (training shortened by QKV_MAX_STEPS and QKV_SET, which ``qkv train`` and ``qkv cv``
honour), then
the Python blocks with ``exec`` (they use the runs the commands trained). A command that needs the
network or hours is in SKIP with its reason; a README command that matches neither fails the test,
as does one that exits non-zero.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

#: README commands not run here, by their start, with the reason.
SKIP = {
    "make demo": "creates .venv and trains for minutes; tests/test_cli_consistency.py checks its log, the "
                 "commands below check qkv itself",
    "make test": "this is make test",
    "qkv data ": "downloads (needs a network); tests/test_data_fetch.py runs the fetchers on local files",
    "qkv study ": "minutes even with --quick; tests/test_studies.py runs both studies on tiny settings",
    "torchrun ": "8 processes; tests/test_distributed.py runs DDP and FSDP with 2",
}
COMMAND = re.compile(r"^(qkv|make|torchrun|python)( |$)")
#: made before the README's commands run: what they read (an ensemble member trained like the README's run)
SETUP = ["qkv train configs/digits-vit.yaml --out runs/digits-s2 --set train.seed=2"]
#: QKV_SET for a preset's training (after QKV_MAX_STEPS=2): smaller batches and models, so that the
#: README's commands run in seconds on 2 CPU cores; the commands themselves run as written
SHORTER = {
    "shakespeare-char": "data.batch_size=2;data.eval_batches=1;model.n_layers=1;model.d_model=32;model.n_heads=2;"
                        "model.block_size=32",
    "multi30k-en-de": "data.max_tokens=256;model.n_encoder_layers=1;model.n_decoder_layers=1;model.d_model=32;"
                      "model.n_heads=2;model.d_ff=64",
    "sst2-minilm": "data.batch_size=4",
    "digits-vit": "data.batch_size=16",
}


@dataclass(frozen=True)
class Block:
    kind: str   # "shell" (one command line) or "python" (a fenced block)
    text: str
    line: int   # 1-based line in README.md

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text.splitlines()[0][:60]}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks (```python, ```bash/sh/shell: one Block per command) and indented command lines."""
    blocks, fence, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.strip().startswith("```"):
                blocks += _fenced(fence, body, start)
                fence = None
            else:
                body.append(line)
        elif line.strip().startswith("```"):
            fence, body, start = line.strip()[3:].strip() or "text", [], i + 1
        elif line.startswith("    ") and COMMAND.match(line.strip()):
            blocks.append(Block("shell", line.strip(), i))
    if fence is not None:
        raise ValueError(f"README.md:{start - 1}: a code fence is never closed")
    return blocks


def _fenced(lang: str, body: list[str], start: int) -> list[Block]:
    if lang == "python":
        return [Block("python", "\n".join(body), start)]
    if lang in ("bash", "sh", "shell", "console"):
        return [Block("shell", line.strip(), start + j) for j, line in enumerate(body)
                if COMMAND.match(line.strip())]
    return []


def skipped(block: Block) -> str | None:
    return next((why for start, why in SKIP.items() if block.text.startswith(start)), None)


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


# -- the tiny world the commands run in -----------------------------------------------------------------
PAIRS = [("A man rides a bike.", "Ein Mann fährt Rad."),
         ("Two dogs play in the snow.", "Zwei Hunde spielen im Schnee."),
         ("A woman reads a book.", "Eine Frau liest ein Buch."),
         ("Children run on the beach.", "Kinder laufen am Strand.")]


def make_world(folder: Path) -> None:
    """The configs, and tiny files at every path the README's commands and the presets' data name."""
    shutil.copytree(ROOT / "qkv" / "configs", folder / "configs")
    m30k = folder / "data" / "multi30k"
    m30k.mkdir(parents=True)
    for split, n in (("train", 24), ("val", 4)):
        pairs = [PAIRS[i % len(PAIRS)] for i in range(n)]
        (m30k / f"{split}.en").write_text("".join(f"{en}\n" for en, _ in pairs), encoding="utf-8")
        (m30k / f"{split}.de").write_text("".join(f"{de}\n" for _, de in pairs), encoding="utf-8")
    (folder / "my.en").write_text("A man rides a bike.\nTwo dogs play.\n", encoding="utf-8")
    excerpt = (ROOT / "qkv" / "assets" / "shakespeare_excerpt.txt").read_text(encoding="utf-8")
    (folder / "my.txt").write_text(excerpt[:20000], encoding="utf-8")
    (folder / "held_out.txt").write_text(excerpt[20000:21000], encoding="utf-8")
    sst2 = folder / "data" / "sst2"
    sst2.mkdir(parents=True)
    rows = [(str(i % 2), f"{'a gripping, lovely' if i % 2 else 'a dull, tedious'} film number {i}") for i in range(16)]
    for name in ("train.tsv", "dev.tsv"):
        (sst2 / name).write_text("label\tsentence\n" + "".join(f"{a}\t{b}\n" for a, b in rows), encoding="utf-8")
    shutil.copy(sst2 / "dev.tsv", folder / "dev.tsv")
    (folder / "reviews.txt").write_text("a gripping film\na dull film\n", encoding="utf-8")
    (folder / "sentences.txt").write_text("a gripping film\na dull film\nanother one\n", encoding="utf-8")
    _digit_pictures(folder)


def _digit_pictures(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:2]  # (2, 8, 8), values 0..16
    for name, image in zip(("a.png", "b.png"), images):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / name)


def run_shell(command: str, folder: Path) -> subprocess.CompletedProcess:
    shorter = next((v for name, v in SHORTER.items() if f"configs/{name}.yaml" in command), "")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
           "QKV_MAX_STEPS": "2", "QKV_SET": shorter, "OMP_NUM_THREADS": "1", "QKV_DEBUG": "1"}
    return subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict[int, subprocess.CompletedProcess]]:
    """The folder, and the result of each README shell command (by line), run in README order."""
    folder = tmp_path_factory.mktemp("readme")
    make_world(folder)
    for command in SETUP:
        done = run_shell(command, folder)
        assert done.returncode == 0, f"set-up {command!r} failed:\n{done.stderr[-3000:]}"
    results = {}
    for block in BLOCKS:
        if block.kind == "shell" and skipped(block) is None:
            results[block.line] = run_shell(block.text, folder)
    return folder, results


def test_the_readme_has_what_this_test_reads():
    kinds = [b.kind for b in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("shell") >= 20
    assert all(b.text.startswith(tuple(SKIP)) for b in BLOCKS if skipped(b)), "skip table"


def test_the_extractor_finds_fenced_and_indented_commands():
    text = "x\n\n    qkv plot r   # c\n    qkv/  not a command\n```bash\nqkv a\nls\n```\n```python\nx = 1\n```\n"
    assert [(b.kind, b.text, b.line) for b in readme_blocks(text)] == [
        ("shell", "qkv plot r   # c", 3), ("shell", "qkv a", 6), ("python", "x = 1", 10)]
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```python\nx\n")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "shell"], ids=str)
def test_readme_command_runs(world, block):
    if skipped(block):
        pytest.skip(skipped(block))
    done = world[1][block.line]
    assert done.returncode == 0, f"{block}\n$ {block.text}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "python"], ids=str)
def test_readme_python_block_runs(world, block, monkeypatch):
    monkeypatch.chdir(world[0])
    exec(compile(block.text, str(block), "exec"), {"__name__": "readme"})
