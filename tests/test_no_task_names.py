"""House style rule 16: a family's knowledge lives in its task (qkv/tasks/) and its model (qkv/models/).

Everywhere else (the CLI, cv, the pictures, the engine) calls the task interface, so this test
reads every other module of qkv and fails on a task name written as a string (a dispatch on the
task) or an ``isinstance`` over model classes (a ladder over the families). Docstrings may name
tasks; a config literal may say which task it is (``{"task": "lm", ...}``, as a YAML preset does).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qkv.tasks import TASKS

QKV = Path(__file__).resolve().parents[1] / "qkv"
FAMILY_DIRS = ("tasks", "models")
# the one converter of foreign checkpoints (rule 7) checks that it was given the family it converts
MAY_CHECK_MODEL_TYPE = {"convert.py"}


def model_classes() -> set[str]:
    """Names of the classes defined in qkv/models/."""
    names = set()
    for path in (QKV / "models").glob("*.py"):
        names |= {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)}
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _config_task_values(tree: ast.AST) -> set[int]:
    """The values of "task" keys in dict literals: a config naming its own task."""
    return {id(v) for node in ast.walk(tree) if isinstance(node, ast.Dict)
            for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "task"}


def _names(node: ast.AST) -> set[str]:
    """Class names in isinstance's second argument: Name, module.Name, or a tuple of them."""
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def violations(source: str, *, where: str, check_types: bool = True) -> list[str]:
    """Task-name strings and isinstance checks over model classes in one module's source."""
    tree = ast.parse(source)
    allowed = _docstrings(tree) | _config_task_values(tree)
    families, tasks = model_classes(), set(TASKS)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed:
            if node.value in tasks:
                found.append(f"{where}:{node.lineno}: task name {node.value!r}")
        if (check_types and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance" and len(node.args) == 2):
            hit = sorted(_names(node.args[1]) & families)
            if hit:
                found.append(f"{where}:{node.lineno}: isinstance over model classes {hit}")
    return found


def modules_outside_the_families() -> list[Path]:
    return sorted(p for p in QKV.rglob("*.py") if p.relative_to(QKV).parts[0] not in FAMILY_DIRS)


def test_no_task_names_or_model_ladders_outside_tasks_and_models():
    found = []
    for path in modules_outside_the_families():
        rel = path.relative_to(QKV).as_posix()
        found += violations(path.read_text(encoding="utf-8"), where=f"qkv/{rel}",
                            check_types=rel not in MAY_CHECK_MODEL_TYPE)
    assert not found, "family knowledge outside qkv/tasks and qkv/models:\n" + "\n".join(found)


def test_the_modules_read_include_the_cli_cv_and_the_pictures():
    read = {p.relative_to(QKV).as_posix() for p in modules_outside_the_families()}
    assert {"cli.py", "cv.py", "attention_maps.py", "viz_image.py", "viz.py", "attention_page.py", "train.py"} <= read
    assert not any(r.startswith(("tasks/", "models/")) for r in read)


@pytest.mark.parametrize("source, expected", [
    ('if cfg.task == "lm":\n    pass\n', "task name 'lm'"),
    ('TRANSLATION = ("translation", "translation-rnn")\n', "task name 'translation'"),
    ('x = f"needs an {\'image_classification\'} run"\n', "task name 'image_classification'"),
    ("if isinstance(model, (Transformer, RNNSeq2Seq)):\n    pass\n", "isinstance over model classes"),
    ("ok = isinstance(model, vit.ImageEmbedder)\n", "'ImageEmbedder'"),
])
def test_the_check_fails_on_what_it_forbids(source, expected):
    found = violations(source, where="probe.py")
    assert found and expected in found[0]


def test_the_check_allows_docstrings_and_configs():
    source = '"""The \'lm\' task."""\nCONFIG = {"task": "lm", "data": {}}\nisinstance(x, dict)\n'
    assert violations(source, where="probe.py") == []
