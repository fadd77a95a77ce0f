"""Reading a checkpoint ahead of the loader (provisioning/prefetch.py): what is read, in
which order, within memory, and that it lands in the page cache."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpubake.provisioning import prefetch


def _tree(root: Path) -> dict[str, int]:
    sizes = {"vae/w.safetensors": 300, "text_encoder/a.safetensors": 200, "transformer_2/b.safetensors": 100,
             "transformer/a.safetensors": 100, "model_index.json": 10, "transformer/config.json": 5}
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return sizes


def test_plan_is_the_loaders_order_each_inode_once_within_the_budget(tmp_path):
    sizes = _tree(tmp_path)
    (tmp_path / "transformer_2" / "link.safetensors").hardlink_to(tmp_path / "transformer" / "a.safetensors")
    rels = [*sizes, "transformer_2/link.safetensors"]
    names = [p.relative_to(tmp_path).as_posix() for p in prefetch.plan(tmp_path, rels, None)]
    assert names == ["transformer/a.safetensors", "transformer/config.json", "transformer_2/b.safetensors",
                     "text_encoder/a.safetensors", "vae/w.safetensors", "model_index.json"]
    # the budget keeps a prefix: the experts first, nothing read that memory cannot hold
    names = [p.relative_to(tmp_path).as_posix() for p in prefetch.plan(tmp_path, rels, 420)]
    assert names == ["transformer/a.safetensors", "transformer/config.json", "transformer_2/b.safetensors",
                     "text_encoder/a.safetensors"]


def test_plan_never_reads_a_symlink_or_a_path_out_of_the_checkpoint(tmp_path):
    root = tmp_path / "model"
    _tree(root)
    (tmp_path / "secret").write_text("not a weight")
    (root / "transformer" / "evil.safetensors").symlink_to(tmp_path / "secret")
    chosen = prefetch.plan(root, ["transformer/evil.safetensors", "../secret", "vae/w.safetensors", "missing.bin"], None)
    assert chosen == [root / "vae" / "w.safetensors"]


def test_prefetch_reads_every_byte_and_reports_a_missing_file(tmp_path):
    sizes = _tree(tmp_path)
    big = tmp_path / "transformer" / "big.safetensors"
    big.write_bytes(os.urandom(3 * prefetch.CHUNK_BYTES // 2))  # more than one chunk
    files = prefetch.plan(tmp_path, [*sizes, "transformer/big.safetensors"], None)
    gone = tmp_path / "vae" / "w.safetensors"
    job = prefetch.Prefetch(files, threads=3).start()
    assert job.wait(timeout=60)
    summary = job.summary()
    assert summary["finished"] and summary["errors"] == [] and summary["files"] == len(files)
    assert summary["bytes_read"] == sum(sizes.values()) + big.stat().st_size
    gone.unlink()
    job = prefetch.Prefetch(files, threads=2).start()
    assert job.wait(timeout=60)
    assert job.summary()["errors"] == ["w.safetensors: No such file or directory"]


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")
def test_prefetched_files_are_in_the_page_cache(tmp_path):
    """Dropped from the cache (POSIX_FADV_DONTNEED after an fsync), then read ahead: fincore
    (mincore(2)) counts the file's pages resident again."""
    path = tmp_path / "transformer" / "w.safetensors"
    path.parent.mkdir()
    path.write_bytes(os.urandom(8 << 20))

    def resident() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident() > (1 << 20):
        pytest.skip("this filesystem keeps the pages despite POSIX_FADV_DONTNEED")
    assert prefetch.Prefetch([path]).start().wait(timeout=60)
    assert resident() == path.stat().st_size


def test_off_or_nothing_to_read_starts_nothing_and_a_second_start_shares_the_first(tmp_path, monkeypatch):
    sizes = _tree(tmp_path)
    monkeypatch.delenv("GPUBAKE_PREFETCH", raising=False)  # off by default: it did not win (docs/benchmarks.md)
    assert prefetch.start_for_checkpoint(tmp_path, sizes) is None
    monkeypatch.setenv("GPUBAKE_PREFETCH", "off")
    assert prefetch.start_for_checkpoint(tmp_path, sizes) is None
    monkeypatch.setenv("GPUBAKE_PREFETCH", "on")
    assert prefetch.start_for_checkpoint(tmp_path, []) is None
    job = prefetch.start_for_checkpoint(tmp_path, sizes)
    assert job is not None and job.wait(timeout=60) and job.summary()["bytes_read"] == sum(sizes.values())
    assert prefetch.start_for_checkpoint(tmp_path / "." / "vae" / "..", sizes) is job  # the pool's next worker


def test_mem_available_reads_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       1000 kB\nMemAvailable:     512 kB\n")
    assert prefetch.mem_available(tmp_path / "meminfo") == 512 * 1024
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    assert prefetch.mem_available(tmp_path / "meminfo") is None
