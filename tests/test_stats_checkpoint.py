"""Checkpoint and resume of the statistics pass; bad files; atomic output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from flashmm import DataError, MultiGeneMixedLM, StatsError
from flashmm._design import build_formula_design
from flashmm._pass import DELAY_ENV
from flashmm.cli import checkpoint_path, main
from flashmm.stats import SufficientStats

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")

FORMULA = "~ 0 + np.log(libsize) + cls"
ROOT = Path(__file__).resolve().parents[1]
N_CELLS, CHUNK = 3000, 100


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    rng = np.random.default_rng(3)
    X = sp.random(N_CELLS, 60, density=0.2, format="csr", dtype=np.float32, rng=rng,
                  data_rvs=lambda k: rng.poisson(2.0, size=k) + 1.0)
    obs = pd.DataFrame({"cls": pd.Categorical(rng.choice(["a", "b", "c"], N_CELLS)),
                        "sam": pd.Categorical(rng.choice([f"s{i}" for i in range(9)], N_CELLS)),
                        "libsize": np.asarray(X.sum(axis=1)).ravel() + 1.0},
                       index=[f"c{i}" for i in range(N_CELLS)])
    ad = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(60)]))
    path = tmp_path_factory.mktemp("ckpt") / "cells.h5ad"
    ad.write_h5ad(path)
    return path


def _stats_args(path, out, *extra):
    return ["stats", str(path), "--formula", FORMULA, "--groups", "sam", "--transform", "log2p1",
            "--chunk-size", str(CHUNK), "--checkpoint-every", "2", "--out", str(out), *extra]


def _run_cli(argv, delay=0.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[DELAY_ENV] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "flashmm", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoint_row(ckpt: Path) -> int:
    try:
        with np.load(ckpt, allow_pickle=False) as f:
            return json.loads(str(f["meta"]))["next_row"]
    except (OSError, ValueError, KeyError):
        return 0


def _same(a: SufficientStats, b: SufficientStats) -> None:
    for key in ("XX", "ZX", "ZZ", "XY", "ZY", "yy", "n_cells"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_sigkill_then_rerun_resumes_with_identical_statistics(h5ad, tmp_path, capsys):
    full = tmp_path / "full.npz"
    assert main(_stats_args(h5ad, full, "--quiet")) == 0
    out = tmp_path / "killed.npz"
    ckpt = Path(checkpoint_path(str(out)))
    proc = _run_cli(_stats_args(h5ad, out), delay=0.1)    # 30 chunks, 0.1 s each
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_row(ckpt) < 0.6 * N_CELLS:       # killed at 60% or a little later
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()                                # never a partial output
    done = _checkpoint_row(ckpt)
    assert 0.6 * N_CELLS <= done < N_CELLS
    # a checkpoint of another formula or chunking is refused and left alone
    capsys.readouterr()
    other = _stats_args(h5ad, out, "--quiet")
    other[other.index(FORMULA)] = "~ 0 + cls"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "different pass" in err and "formula" in err and str(ckpt) in err
    rechunked = _stats_args(h5ad, out, "--quiet")
    rechunked[rechunked.index("--chunk-size") + 1] = "150"
    assert main(rechunked) == 2
    assert "chunk_cells" in capsys.readouterr().err
    assert ckpt.exists() and not out.exists()
    # the same command again: resumes from the checkpoint, same numbers bit for bit
    assert main(_stats_args(h5ad, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming from checkpoint {ckpt}: {done} of {N_CELLS} cells done" in err
    assert f"statistics pass done: {N_CELLS - done} cells" in err
    assert "peak memory" in err and "cells/s" in err
    _same(SufficientStats.load(out), SufficientStats.load(full))
    assert not ckpt.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.npz", "killed.npz"]


class _Interrupt(Exception):
    pass


def test_python_builder_resumes_from_its_checkpoint(h5ad, tmp_path):
    adata = anndata.read_h5ad(h5ad, backed="r")
    try:
        from flashmm._anndata import anndata_inputs

        obs, endog, genes = anndata_inputs(adata)
        design = build_formula_design(FORMULA, obs, groups="sam")
        kw = {"transform": "log2p1", "chunk_size": CHUNK, "gene_names": genes,
              "checkpoint_every": 3}
        full = SufficientStats.from_design(design, endog, **kw)
        ckpt = tmp_path / "pass.ckpt.npz"
        seen = []

        def stop_after_half(k):
            seen.append(k)
            if sum(seen) >= N_CELLS // 2:
                raise _Interrupt

        with pytest.raises(_Interrupt):
            SufficientStats.from_design(design, endog, progress=stop_after_half, checkpoint=ckpt, **kw)
        assert _checkpoint_row(ckpt) == 1200          # 12 chunks done of 15, checkpoint every 3
        resumed = []
        again = SufficientStats.from_design(design, endog, progress=resumed.append, checkpoint=ckpt, **kw)
        assert resumed[0] == 1200 and sum(resumed) == N_CELLS
        _same(again, full)
        assert not ckpt.exists()
        # another transform: refused, with what differs
        SufficientStats.from_design(design, endog, progress=lambda k: None, checkpoint=ckpt, **kw)
        with pytest.raises(_Interrupt):
            seen.clear()
            SufficientStats.from_design(design, endog, progress=stop_after_half, checkpoint=ckpt, **kw)
        with pytest.raises(StatsError, match="different pass.*transform"):
            SufficientStats.from_design(design, endog, checkpoint=ckpt,
                                        **{**kw, "transform": "log1p"})
    finally:
        adata.file.close()


def _rewrite_last(path: Path, name: str) -> tuple[int, int]:
    """Rewrite X/<name> as the last (contiguous) dataset of the file: (offset, nbytes)."""
    with h5py.File(path, "r+") as f:
        values = f["X"][name][...]
        del f["X"][name]
        ds = f["X"].create_dataset(name, data=values)
        return ds.id.get_offset(), values.nbytes


def test_truncated_file_is_refused_naming_the_file(h5ad, tmp_path, capsys):
    """HDF5 checks the end of the file on opening: refused before any chunk is read."""
    bad = tmp_path / "truncated.h5ad"
    bad.write_bytes(h5ad.read_bytes())
    offset, nbytes = _rewrite_last(bad, "data")
    with open(bad, "r+b") as f:
        f.truncate(offset + nbytes // 2)
    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(_stats_args(bad, out, "--quiet")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashmm: error:") and str(bad) in err
    assert "truncated or corrupted" in err and "\n" not in err
    assert not out.exists() and not Path(checkpoint_path(str(out))).exists()
    with pytest.raises(DataError, match="truncated or corrupted"):
        MultiGeneMixedLM.from_formula(FORMULA, bad, groups="sam")


def test_corrupted_indices_name_the_file_and_chunk(h5ad, tmp_path, capsys):
    bad = tmp_path / "corrupted.h5ad"
    bad.write_bytes(h5ad.read_bytes())
    offset, nbytes = _rewrite_last(bad, "indices")
    with h5py.File(bad, "r") as f:
        ptr = f["X"]["indptr"][...]
    item = nbytes // int(ptr[-1])
    with open(bad, "r+b") as f:                         # garbage in the indices of cell 2,050
        f.seek(offset + int(ptr[2050]) * item)
        f.write(b"\xff\x7f" * item)
    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(_stats_args(bad, out, "--quiet")) == 2
    err = capsys.readouterr().err.strip()
    assert f"chunk 20 (cells 2000-2099) of {str(bad)!r}" in err and "truncated or corrupted" in err
    assert not out.exists()


def test_short_data_array_names_the_chunk(h5ad, tmp_path, capsys):
    """X/data holding fewer values than X/indptr promises (a cut-off write): the chunk is named."""
    bad = tmp_path / "short.h5ad"
    bad.write_bytes(h5ad.read_bytes())
    with h5py.File(bad, "r+") as f:
        ptr = f["X"]["indptr"][...]
        values = f["X"]["data"][: int(ptr[1550])]
        del f["X"]["data"]
        f["X"].create_dataset("data", data=values)
    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(_stats_args(bad, out, "--quiet")) == 2
    err = capsys.readouterr().err.strip()
    assert f"chunk 15 (cells 1500-1599) of {str(bad)!r}" in err and "ends before" in err
    assert not out.exists()


def _stderr_on_a_terminal(argv) -> str:
    """Run the CLI with stderr on a pseudo-terminal; what it showed there."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # 100 columns
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "flashmm", *argv], env=env, stderr=slave,
                            stdout=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:      # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_quiet(h5ad, tmp_path):
    pytest.importorskip("tqdm")
    shown = _stderr_on_a_terminal(_stats_args(h5ad, tmp_path / "a.npz"))
    assert "statistics pass" in shown and "cells/s" in shown and "<" in shown   # rate, ETA
    assert "100%" in shown and "peak memory" in shown
    quiet = _stderr_on_a_terminal(_stats_args(h5ad, tmp_path / "b.npz", "--quiet"))
    assert "cells/s" not in quiet and "%" not in quiet and "saved statistics" in quiet
