"""Writing the user's files (issue 20, item 1; STYLE.md rule 21) and a real full disk (item 2).

qkv.fileio.atomic_write_bytes replaces only regular files (temp + fsync + rename); it writes
through symlinks, writes devices and FIFOs directly, and gives files the umask's mode. The full
disk is a real tmpfs of a few hundred KB mounted in a private mount namespace (``unshare -m``),
skipped where the machine does not allow it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from qkv import checkpoint as ckpt
from qkv.errors import WriteError
from qkv.fileio import atomic_write_bytes, atomic_write_text, replace_bytes

ROOT = Path(__file__).resolve().parents[1]


def with_umask(mask: int, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- regular files --------------------------------------------------------------------------------
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_umask_mode(tmp_path, mask, mode):
    path = tmp_path / "out.txt"
    with_umask(mask, lambda: atomic_write_text(path, "hello\n"))
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert leftovers(tmp_path) == []


def test_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    path.chmod(0o640)
    with_umask(0o077, lambda: atomic_write_text(path, "new\n"))
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_existing_regular_file_is_replaced_atomically(tmp_path):
    """A reader holding the old file keeps reading the old bytes: it was renamed over, not truncated."""
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with open(path) as reader:
        atomic_write_text(path, "new\n")
        assert reader.read() == "old\n"
    assert path.read_text() == "new\n"


def test_new_file_in_a_new_folder(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_folder_at_the_path_is_refused_naming_it(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(WriteError, match=r"cannot write .*d: it is a folder") as info:
        atomic_write_bytes(tmp_path / "d", b"x")
    assert info.value.errno == errno.EISDIR and "\n" not in str(info.value)
    assert (tmp_path / "d").is_dir()


def test_file_under_a_file_names_the_path_and_is_an_oserror(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError, match=r"^cannot write .*plain/e\.npy: ") as info:
        atomic_write_bytes(tmp_path / "plain" / "e.npy", b"x")
    assert isinstance(info.value, WriteError) and "[Errno" not in str(info.value)


# -- symlinks -------------------------------------------------------------------------------------
def test_symlink_to_a_file_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real" / "data.txt"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


def test_relative_and_chained_symlinks_are_followed(tmp_path):
    (tmp_path / "target.txt").write_text("old")
    (tmp_path / "one").symlink_to("target.txt")
    (tmp_path / "two").symlink_to("one")
    atomic_write_text(tmp_path / "two", "new")
    assert (tmp_path / "two").is_symlink() and (tmp_path / "one").is_symlink()
    assert (tmp_path / "target.txt").read_text() == "new"


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "made.txt")
    with_umask(0o022, lambda: atomic_write_text(link, "x"))
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "x"
    assert stat.S_IMODE((tmp_path / "made.txt").stat().st_mode) == 0o644


def test_symlink_loop_is_a_write_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(WriteError, match=r"cannot write .*a: "):
        atomic_write_text(tmp_path / "a", "x")


def test_replace_bytes_replaces_a_planted_symlink(tmp_path):
    """qkv's own files (checkpoints/latest) are replaced, never followed to somewhere else."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    pointer = tmp_path / "latest"
    pointer.symlink_to(outside)
    replace_bytes(pointer, b"step_00000002")
    assert not pointer.is_symlink() and pointer.read_bytes() == b"step_00000002"
    assert outside.read_text() == "keep me"


# -- devices, pipes, stdout ----------------------------------------------------------------------
def test_fifo_is_written_directly_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}

    def read():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    atomic_write_bytes(fifo, b"through the pipe\n")
    reader.join(timeout=10)
    assert got.get("data") == b"through the pipe\n"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_symlink_to_a_fifo_writes_the_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_text(tmp_path / "link", "x\n")
    reader.join(timeout=10)
    assert got.get("data") == b"x\n" and (tmp_path / "link").is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dev_null_is_opened_not_replaced():
    """/dev/null is only opened for writing (never replaced), so this touches nothing."""
    before = os.stat("/dev/null")
    atomic_write_bytes("/dev/null", b"discarded")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)


def test_dash_writes_stdout(capfdbinary):
    atomic_write_bytes("-", b"to stdout\n")
    assert capfdbinary.readouterr().out == b"to stdout\n"


# -- checkpoints ----------------------------------------------------------------------------------
def test_weights_and_checkpoints_get_umask_modes(tmp_path):
    model = torch.nn.Linear(3, 2)

    def save():
        ckpt.save_weights(model, tmp_path / "model.safetensors")
        return ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, {}, keep=2)

    step = with_umask(0o022, save)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(step.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in step.iterdir()} == {0o644}


def test_latest_pointer_never_leads_outside_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    first = ckpt.save_checkpoint(tmp_path / "run", 1, model, {"step": 1}, {}, keep=3)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(first, elsewhere)
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    for planted in (str(elsewhere), "../../elsewhere", "step_00000001/../../../elsewhere"):
        pointer.write_text(planted)
        assert ckpt.latest_checkpoint(tmp_path / "run") == first
    pointer.unlink()
    pointer.symlink_to(tmp_path / "outside-latest")
    (tmp_path / "outside-latest").write_text("step_00000001")
    ckpt.save_checkpoint(tmp_path / "run", 2, model, {"step": 2}, {}, keep=3)
    assert not pointer.is_symlink() and pointer.read_text() == "step_00000002"
    assert (tmp_path / "outside-latest").read_text() == "step_00000001"  # not written through


# -- a real full disk -----------------------------------------------------------------------------
FULL_DISK_CHILD = r'''
import json, os, sys
from pathlib import Path
import torch
from qkv import checkpoint as ckpt
from qkv.fileio import atomic_write_bytes

disk = Path(sys.argv[1])
out = []

def attempt(case, fn, final):
    try:
        fn()
        out.append({"case": case, "raised": None})
    except BaseException as err:
        out.append({"case": case, "raised": [c.__name__ for c in type(err).__mro__], "errno": getattr(err, "errno", None),
                    "message": str(err), "final_exists": Path(final).exists(), "final": str(final)})

big = {"w": torch.zeros(400_000)}  # 1.6 MB: more than the disk holds
small = torch.nn.Linear(4, 4)
attempt("save_weights", lambda: ckpt.save_weights(big, disk / "run" / "model.safetensors"),
        disk / "run" / "model.safetensors")
attempt("save_checkpoint weights", lambda: ckpt.save_checkpoint(disk / "run", 3, big, {}, {}, keep=2),
        disk / "run" / "checkpoints" / "step_00000003")
attempt("save_checkpoint train_state", lambda: ckpt.save_checkpoint(disk / "run", 4, small, {"m": torch.zeros(400_000)}, {},
        keep=2), disk / "run" / "checkpoints" / "step_00000004")
attempt("atomic_write_bytes new", lambda: atomic_write_bytes(disk / "out.bin", b"x" * 1_600_000), disk / "out.bin")
(disk / "kept.txt").write_text("old contents")
attempt("atomic_write_bytes existing", lambda: atomic_write_bytes(disk / "kept.txt", b"x" * 1_600_000), disk / "kept.txt")
print(json.dumps({"results": out, "kept": (disk / "kept.txt").read_text(),
                  "files": sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))}))
'''


def _namespace_prefix() -> list[str] | None:
    """The unshare command that may mount a tmpfs here, or None (skipped)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    options = [["unshare", "-m"]] if os.geteuid() == 0 else []
    for prefix in options + [["unshare", "-m", "--map-root-user"]]:
        probe = subprocess.run([*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


def test_real_full_disk_gives_one_line_errors_naming_the_file(tmp_path):
    """ENOSPC on a 512 KB tmpfs: qkv's own errors name the file, nothing is left under the final name."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -m not permitted)")
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "child.py").write_text(FULL_DISK_CHILD)
    script = f'mount -t tmpfs -o size=512k tmpfs "$1" && exec "{sys.executable}" "$2" "$1"'
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*prefix, "sh", "-c", script, "sh", str(disk), str(tmp_path / "child.py")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["results"]) == 5
    for result in report["results"]:
        case, raised = result["case"], result["raised"]
        assert raised is not None, f"{case}: a write larger than the disk succeeded"
        assert "SafetensorError" not in raised and "RuntimeError" not in raised, result
        assert "CheckpointError" in raised or "WriteError" in raised, result
        assert "\n" not in result["message"] and "No space left on device" in result["message"], result
        name = Path(result["final"]).name
        assert name in result["message"], result  # names the file (or checkpoint) not written
        assert "Errno" not in result["message"] and ".tmp" not in result["message"], result
        if case != "atomic_write_bytes existing":  # that one must keep the old file, checked below
            assert not result["final_exists"], f"{case}: a partial file is left under its final name"
    assert report["kept"] == "old contents"  # the failed replacement left the old file whole
    hidden = [f for f in report["files"] if any(part.startswith(".") for part in Path(f).parts)]
    assert hidden == [], hidden  # no temporary files or folders left behind
    assert disk.exists() and list(disk.iterdir()) == []  # the tmpfs was private: nothing reached the real folder
