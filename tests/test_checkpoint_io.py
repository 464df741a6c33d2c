"""Third-party pickles: plain NumPy data loads under both NumPy spellings, anything that could run code
is refused with a message naming the global and the keys the file holds (and is never run)."""

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vistok.cli import main
from vistok.convert.checkpoint_io import read_checkpoint, top_level_keys


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_numpy_scalars_and_dtypes_load_under_numpy2_names(tmp_path):
    # NumPy-1 spelling (numpy.core.multiarray.scalar): tests/data/toklip_official, written by NumPy 1.26,
    # is read in test_toklip_official.py; this file is written by this environment's NumPy 2
    obj = {"state_dict": {"w": torch.ones(2)}, "lr": np.float64(0.25), "step": np.int64(7),
           "half": np.float16(1.5), "flag": np.bool_(True), "dtype": np.dtype("float32")}
    torch.save(obj, tmp_path / "np2.pt")
    out = read_checkpoint(tmp_path / "np2.pt")
    assert out["lr"] == 0.25 and isinstance(out["lr"], np.float64)
    assert out["step"] == 7 and out["half"] == np.float16(1.5) and out["flag"] and out["dtype"] == np.float32


def test_code_executing_global_is_refused_named_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "optimizer": {"lr": np.float64(1e-5)},
                "hook": _RunsCode(marker)}, src)
    with pytest.raises(ValueError) as err:
        read_checkpoint(src)
    msg = str(err.value)
    assert "needs code execution" in msg and f"{os.system.__module__}.system" in msg
    assert "the file holds the keys ['state_dict', 'optimizer', 'hook']" in msg
    assert "torch.load(f, weights_only=False)['state_dict']" in msg
    assert top_level_keys(src) == ["state_dict", "optimizer", "hook"]
    assert not marker.exists()


def test_cli_error_names_the_refused_global_and_the_state_dict_key(tmp_path):
    src = tmp_path / "TokLIP_evil.pt"
    torch.save({"epoch": 1, "state_dict": {"visual.trunk.pos_embed": torch.zeros(1, 4, 8)}, "fn": eval}, src)
    res = CliRunner().invoke(main, ["convert", "toklip", str(src), str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "builtins.eval" in errors[0] and "['state_dict']" in errors[0]
    assert "['model']" not in errors[0]


def test_top_level_keys_of_non_zip_or_non_mapping_files_are_empty(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    assert top_level_keys(tmp_path / "list.pt") == [] and top_level_keys(tmp_path / "junk.pt") == []


def test_crafted_numpy_dtype_state_is_refused_not_read_out_of_bounds(tmp_path):
    """A bytes dtype whose pickled state claims a 1 MiB item behind the item-is-pointer flag makes
    NumPy's `scalar` read out of bounds (a segfault); such dtypes are not allowed. Read in a child
    process, so that a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    src = tmp_path / "crafted.pt"
    writer = f"""
import numpy as np, torch
try:
    from numpy._core.multiarray import scalar
except ImportError:
    from numpy.core.multiarray import scalar
d = np.dtype("S8")
d.__setstate__((3, "|", None, None, None, 1 << 20, 1, 4))   # itemsize 1 MiB, NPY_ITEM_IS_POINTER
class R:
    def __reduce__(self):
        return scalar, (d, b"A" * (1 << 20))
torch.save({{"state_dict": {{"w": torch.zeros(1)}}, "lr": R()}}, {str(src)!r})
"""
    subprocess.run([sys.executable, "-c", writer], check=True)
    reader = f"""
from vistok.convert.checkpoint_io import read_checkpoint
try:
    read_checkpoint({str(src)!r})
except ValueError as exc:
    print("refused:", exc)
"""
    out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"reader crashed (exit {out.returncode}): {out.stderr[-500:]}"
    assert out.stdout.startswith("refused:") and "BytesDType" in out.stdout, out.stdout


def test_truncated_checkpoint_says_it_may_be_truncated(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    for n in (100, 5000, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.pt \(truncated or damaged\?\)"):
            read_checkpoint(tmp_path / "cut.pt")
