import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import ROOT, write_recipe

from upstack.core.recipe import load_recipe
from upstack.core.runner import run

RECIPE = """
    name: resume
    output_dir: {out}
    stages:
      synth:
        seeds: [{{source: arith, count: 40}}]
        teacher: {{kind: scripted, error_rate: 0.2, delay_s: {delay}}}
        augmentations: {{rephrase_question: 2, rephrase_answer: 2}}
"""


def cached_keys(cache_file) -> set[str]:
    """Keys committed so far, read beside the writer (WAL lets a reader in at any time)."""
    try:
        with sqlite3.connect(f"file:{cache_file}?mode=ro", uri=True) as db:
            return {key for (key,) in db.execute("SELECT key FROM replies")}
    except sqlite3.OperationalError:  # the file or its table does not exist yet
        return set()


@pytest.mark.slow
def test_synth_killed_mid_run_resumes_without_redoing_or_losing_a_request(tmp_path):
    # the uninterrupted run, for reference
    reference = load_recipe(
        write_recipe(tmp_path, RECIPE.format(out=tmp_path / "ref", delay=0.0), "ref.yaml")
    )
    run(reference, ["synth"])
    expected = (tmp_path / "ref" / "synth" / "records.jsonl").read_text()
    total = json.loads((tmp_path / "ref" / "synth" / "upstack.json").read_text())["metrics"][
        "requests"
    ]

    # the same recipe, slowed down, killed with SIGKILL once some replies are committed
    path = write_recipe(tmp_path, RECIPE.format(out=tmp_path / "runs", delay=0.01), "slow.yaml")
    cache_file = tmp_path / "runs" / ".upstack" / "work" / "synth" / "requests.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    process = subprocess.Popen(
        [sys.executable, "-m", "upstack", "run", str(path), "synth"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(cached_keys(cache_file)) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = cached_keys(cache_file)
    assert 40 <= len(before) < total, "the kill should land mid-run"
    assert not (tmp_path / "runs" / "synth").exists()  # no half-written stage dir

    run(load_recipe(path), ["synth"])
    stats = json.loads((tmp_path / "runs" / "synth" / "upstack.json").read_text())["metrics"]
    assert (tmp_path / "runs" / "synth" / "records.jsonl").read_text() == expected
    # every reply committed before the kill was reused; only the rest was asked, once
    assert stats["cache_hits"] == len(before)
    assert stats["requests_sent"] == total - len(before)
    assert cached_keys(cache_file) >= before and len(cached_keys(cache_file)) == total


def test_a_damaged_request_cache_is_set_aside_and_rebuilt(tmp_path):
    """A cache file cut short or overwritten is kept under another name, and the run starts a
    new one instead of ending in a sqlite traceback."""
    from data_synth.cache import Cache

    path = tmp_path / "requests.sqlite"
    cache = Cache(path)
    cache.put("k", "solve", [], "answer", 0)
    cache.close()
    path.write_bytes(b"not a database at all" * 100)
    said = []
    again = Cache(path, said.append)
    assert len(again) == 0 and "is damaged" in said[0]
    aside = [
        p
        for p in tmp_path.iterdir()
        if ".damaged-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"not a database")
