"""Atomic saves: no temporary file survives a failed save, killed saves' strays are removed by
the next save, and loading is never affected by them."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cahfp_ops.fl.checkpoint import load_checkpoint, remove_strays, save_atomic

WRITER = textwrap.dedent(
    """
    import signal, sys, torch
    from cahfp_ops.fl.checkpoint import save_atomic
    # Ctrl-C raises KeyboardInterrupt, as in an interactive run, also when this test runs in
    # a background job (which starts its children with SIGINT ignored: Python keeps that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path = sys.argv[1]
    payload = {"state": torch.randn(2_400_000), "round": 0}  # ~9.6 MB
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        payload["round"] = i
        save_atomic(payload, path)
    """
)


def _strays(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".cahfp-tmp"))


def test_failed_save_leaves_no_temporary_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("no")

    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(3)}, path)
    with pytest.raises(pickle.PicklingError):
        save_atomic({"a": torch.zeros(3), "b": Unpicklable()}, path)
    assert _strays(tmp_path) == []
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))  # the old file, untouched


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_saves_killed_mid_write(tmp_path, sig):
    """A loop of saves killed at random moments: SIGINT cleans up on the way out; SIGKILL
    leaves a stray that the next save removes. Every load sees a whole checkpoint."""
    path = tmp_path / "ckpt.pt"
    gen = torch.Generator().manual_seed(int(sig))
    left = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2 + 0.5 * float(torch.rand(1, generator=gen)))
        proc.send_signal(sig)
        proc.wait(30)
        left += len(_strays(tmp_path))
        if path.exists():
            assert load_checkpoint(path)["state"].numel() == 2_400_000
        if sig == signal.SIGINT:
            assert _strays(tmp_path) == []
    if sig == signal.SIGKILL:
        assert left > 0, "no save was ever caught mid-write: the test did not test anything"
    save_atomic({"round": -1}, path)
    assert _strays(tmp_path) == []
    assert load_checkpoint(path) == {"round": -1}


def test_live_savers_temporary_files_are_kept(tmp_path):
    """Only dead processes' strays are removed: a concurrent live saver's file stays."""
    path = tmp_path / "ckpt.pt"
    live = tmp_path / f".ckpt.pt.{os.getppid()}.abc.cahfp-tmp"
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    dead = tmp_path / f".ckpt.pt.{dead_pid}.xyz.cahfp-tmp"
    other = tmp_path / f".other.pt.{dead_pid}.xyz.cahfp-tmp"
    for p in (live, dead, other):
        p.write_bytes(b"partial")
    assert remove_strays(path) == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()
