import hashlib

import numpy as np
import pytest
import torch

from jwth_testutils import TINY, write_tiles
from jwth.cache import CacheMismatchError, TokenCache
from jwth.cache.extract import extract_tokens
from jwth.data.tiles import TileError, read_labels
from jwth.encoders import load_encoder


class Interrupt(Exception):
    pass


def _counting(enc):
    calls = {"tiles": 0}
    orig = enc.forward

    def fwd(x):
        calls["tiles"] += x.shape[0]
        return orig(x)

    enc.forward = fwd
    return calls


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_interrupt_recomputes_nothing(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=5, per_patient=4)  # 20 tiles
    table = read_labels(data)
    enc = load_encoder(TINY)
    calls = _counting(enc)

    def stop(done):
        if done >= 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract_tokens(enc, table, tmp_path / "c", batch_size=4, num_workers=0, on_batch=stop, quiet=True)
    assert calls["tiles"] == 8
    with pytest.raises(RuntimeError, match="incomplete"):
        TokenCache.open(tmp_path / "c")
    partial = TokenCache.open(tmp_path / "c", require_complete=False)
    assert partial.n_done == 8
    partial.close()
    cache = extract_tokens(enc, table, tmp_path / "c", batch_size=4, num_workers=0, quiet=True)
    assert calls["tiles"] == 20  # only the 12 missing tiles were computed
    ref = extract_tokens(load_encoder(TINY), table, tmp_path / "ref", batch_size=7, num_workers=0, quiet=True)
    idx = np.arange(20)
    np.testing.assert_array_equal(cache.read_cls(idx), ref.read_cls(idx))
    np.testing.assert_array_equal(cache.read_patches(idx), ref.read_patches(idx))
    assert cache.tiles["path"].tolist() == table.df["path"].tolist()
    # reading in any order returns rows in that order
    np.testing.assert_array_equal(cache.read_cls([5, 2, 5])[0], ref.read_cls([5])[0])
    np.testing.assert_array_equal(cache.read_patches_f16([5, 2]).astype(np.float32), ref.read_patches([5, 2]))


def test_tokens_stored_fp16_match_encoder(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    enc = load_encoder(TINY + "&reg_tokens=2")
    cache = extract_tokens(enc, table, tmp_path / "c", batch_size=3, num_workers=0, precision="fp32", quiet=True)
    from jwth.data.tiles import load_tile

    x = torch.stack([enc.transform(load_tile(data / p)[0]) for p in table.df["path"]])
    tok = enc(x)
    np.testing.assert_allclose(cache.read_cls(np.arange(4)), tok.cls.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cache.read_registers(np.arange(4)), tok.registers.numpy(), atol=2e-3, rtol=2e-3)
    assert cache.manifest["dtype"] == "float16" and cache.nbytes_per_tile == 2 * 192 * (1 + 2 + 16)


def test_cache_is_never_mixed_across_encoders(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    extract_tokens(load_encoder(TINY), table, tmp_path / "c", num_workers=0, quiet=True).close()
    before = _digest(tmp_path / "c" / "tokens.h5")
    with pytest.raises(CacheMismatchError, match="encoder_spec|weights_hash"):
        extract_tokens(load_encoder(TINY + "&seed=3"), table, tmp_path / "c", num_workers=0, quiet=True)
    # a different tile list is refused too
    sub = table.subset(np.array([True, True, True, False]))
    with pytest.raises(CacheMismatchError, match="tiles_hash"):
        extract_tokens(load_encoder(TINY), sub, tmp_path / "c", num_workers=0, quiet=True)
    assert _digest(tmp_path / "c" / "tokens.h5") == before


def test_tile_broken_mid_run_keeps_finished_work(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=3, per_patient=4)  # 12 tiles
    table = read_labels(data)
    enc = load_encoder(TINY)

    def stop(done):
        if done >= 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract_tokens(enc, table, tmp_path / "c", batch_size=4, num_workers=0, on_batch=stop, quiet=True)
    with TokenCache.open(tmp_path / "c", require_complete=False) as c:
        first = c.read_cls(np.arange(4))
    last = data / table.df["path"].iloc[-1]
    good_bytes = last.read_bytes()
    last.write_bytes(good_bytes[:100])  # truncated after the first run
    with pytest.raises(TileError, match=last.name):
        extract_tokens(enc, table, tmp_path / "c", batch_size=4, num_workers=0, quiet=True)
    with TokenCache.open(tmp_path / "c", require_complete=False) as c:
        assert c.n_done == 8  # the batches before the broken one are kept
        np.testing.assert_array_equal(c.read_cls(np.arange(4)), first)
    last.write_bytes(good_bytes)  # fixed: the run resumes and completes
    done = extract_tokens(enc, table, tmp_path / "c", batch_size=4, num_workers=0, quiet=True)
    assert done.complete


def test_complete_cache_held_by_a_reader_in_another_process(tmp_path):
    """Re-running extraction on a complete cache that another process holds open: nothing to do, no lock error."""
    import subprocess
    import sys

    data = write_tiles(tmp_path / "d", n_patients=4, per_patient=1)
    table = read_labels(data)
    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=32")
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); "
         "sys.stdin.read()", str(tmp_path / "c" / "tokens.h5")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        calls = _counting(enc)
        c = extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True)
        assert c.complete and calls["tiles"] == 0
        c.close()
    finally:
        holder.communicate("", timeout=10)


def test_damaged_cache_files_are_named(tmp_path):
    from jwth.cache import CacheDamagedError

    data = write_tiles(tmp_path / "d", n_patients=4, per_patient=1)
    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=32")
    extract_tokens(enc, read_labels(data), tmp_path / "c", num_workers=0, quiet=True).close()
    h5 = tmp_path / "c" / "tokens.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(CacheDamagedError, match="tokens.h5 cannot be opened as HDF5.*delete the folder"):
        TokenCache.open(tmp_path / "c")


def test_tiles_changed_on_disk_are_refused_not_reused(tmp_path):
    import json
    import os

    from PIL import Image

    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    enc = load_encoder("baseline:colour")
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    assert (tmp_path / "c" / "tile_stats.npy").is_file()
    before = _digest(tmp_path / "c" / "tokens.h5")
    # unchanged tiles: reused as they are
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    # one tile re-exported in place (same path, new content)
    tile = data / table.df["path"][1]
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tile)
    st = tile.stat()
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"tokens of 1 tile\(s\) that have changed on disk.*p0_t1.png.*left untouched"):
        extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True)
    assert _digest(tmp_path / "c" / "tokens.h5") == before


def test_a_data_folder_copied_anew_keeps_its_cache(tmp_path):
    """New modification times with the same bytes (a copy without preserved times) are no change."""
    import os
    import shutil

    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    enc = load_encoder("baseline:colour")
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    before = _digest(tmp_path / "c" / "tokens.h5")
    shutil.copytree(data, tmp_path / "copy")  # copy2 keeps times: move them on explicitly
    for f in (tmp_path / "copy").rglob("*.png"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    shutil.rmtree(data)
    (tmp_path / "copy").rename(data)
    cache = extract_tokens(enc, read_labels(data), tmp_path / "c", num_workers=0, quiet=True)
    assert cache.done_mask.all()
    cache.close()
    assert _digest(tmp_path / "c" / "tokens.h5") == before
    stats = np.load(tmp_path / "c" / "tile_stats.npy")
    assert stats.shape == (4, 3) and (stats[:, 2] != 0).all()


def test_a_cache_with_size_and_time_only_refuses_a_tile_whose_time_changed(tmp_path):
    """Fingerprints written before content digests existed cannot vouch for a touched tile."""
    import os

    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    enc = load_encoder("baseline:colour")
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    f = tmp_path / "c" / "tile_stats.npy"
    np.save(f, np.load(f)[:, :2])
    tile = data / table.df["path"][2]
    st = tile.stat()
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"tokens of 1 tile\(s\).*without content digests.*p1_t0.png"):
        extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True)


def test_a_cache_made_before_the_tile_stats_is_accepted_and_gets_them(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=2, per_patient=2)
    table = read_labels(data)
    enc = load_encoder("baseline:colour")
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    (tmp_path / "c" / "tile_stats.npy").unlink()
    extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True).close()
    assert (tmp_path / "c" / "tile_stats.npy").is_file()
