"""BiMix data mixtures for cpt: entropy-proxy shares, per-source held-out curves, the mixing law fit."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import run_cli, write_recipe

from upstack.train.mixture import Law, best_shares, entropies, fit_law, shares_from_entropy


def test_entropies_order_domains_by_how_predictable_their_tokens_are():
    rng = random.Random(0)
    constant = [
        [7] * 50 for _ in range(20)
    ]  # one token forever: nothing to learn, nothing uncertain
    cycle = [[i % 5 for i in range(50)] for _ in range(20)]  # 5 tokens, each fixing the next
    uniform = [[rng.randrange(50) for _ in range(50)] for _ in range(400)]  # 50 tokens, no order
    h = [entropies(rows) for rows in (constant, cycle, uniform)]
    assert h[0] == {"shannon": 0.0, "joint": 0.0, "conditional": 0.0}
    assert h[1]["shannon"] == pytest.approx(math.log(5), abs=0.01)
    assert h[1]["conditional"] == pytest.approx(0.0, abs=1e-9)  # the next token is certain
    assert h[2]["conditional"] > 3.0 and h[2]["shannon"] == pytest.approx(math.log(50), abs=0.1)
    shares = shares_from_entropy([x["shannon"] for x in h])
    assert shares[0] < shares[1] < shares[2] and sum(shares) == pytest.approx(1)
    soft = shares_from_entropy([x["shannon"] for x in h], "softmax")
    assert soft[2] > shares[2]  # softmax sharpens toward the most uncertain domain


def test_the_law_fit_recovers_known_coefficients_from_noisy_curves():
    truth = {"arith": Law(0.6, 0.25, 3.0, 1.2), "listops": Law(0.4, 0.10, 2.0, 2.5)}
    rng = random.Random(1)
    for law in truth.values():
        points = [
            (s, r, law.loss(s, r) * (1 + rng.gauss(0, 0.005)))  # 0.5% noise
            for r in (0.2, 0.5, 0.8)
            for s in range(10, 210, 20)
        ]
        fitted = fit_law(points)
        # stated tolerance: exponents within 0.05, coefficients within 15%
        assert fitted.alpha == pytest.approx(law.alpha, abs=0.05)
        assert fitted.beta == pytest.approx(law.beta, abs=0.05)
        assert pytest.approx(law.K, rel=0.15) == fitted.K
        assert pytest.approx(law.M, rel=0.15) == fitted.M
    with pytest.raises(ValueError, match="two different shares"):
        fit_law([(10, 0.5, 2.0), (20, 0.5, 1.8)])


def test_best_shares_give_more_to_the_domain_that_needs_it():
    same = Law(0.5, 0.2, 2.0, 1.0)
    assert best_shares([same, same], 100) == pytest.approx([0.5, 0.5])
    hungry = Law(0.5, 0.6, 2.0, 1.0)  # its loss falls faster with more of it
    shares = best_shares([same, hungry], 100)
    assert shares[1] > shares[0] and sum(shares) == pytest.approx(1)
    # the optimum of sum c_i r^-beta_i: no nearby mixture does better
    total = lambda r: same.loss(100, r) + hungry.loss(100, 1 - r)  # noqa: E731
    assert total(shares[0]) <= min(total(shares[0] + d) for d in (-0.02, 0.02))


TINY = """
name: mix
output_dir: {out}
seed: 5
stages:
  init:
    tokenizer: {{vocab_size: 400, corpus_problems: 200}}
    architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                   num_attention_heads: 2, num_key_value_heads: 2}}
{runs}"""
RUN = """  {name}:
    kind: cpt
    model: init
    datasets:
      - arith: {{problems: 120}}
      - generated: {{task: listops, problems: 120}}
      - generated: {{task: noise, problems: 120}}
    eval_fraction: 0.1
    mixture: {{weights: {weights}, rows: 150, sample_rows: 100}}
    trainer: {{max_steps: 8, per_device_train_batch_size: 4, max_length: 64,
              learning_rate: 3.0e-3, logging_steps: 2}}
"""


@pytest.mark.slow
def test_cpt_mixture_records_shares_curves_and_the_fit_reads_them(tmp_path, one_torch_thread):
    runs = "".join(
        RUN.format(name=name, weights=weights)
        for name, weights in (
            ("cpt", "entropy"),
            ("cpt_a", "[0.6, 0.3, 0.1]"),
            ("cpt_b", "[0.2, 0.3, 0.5]"),
        )
    )
    path = write_recipe(tmp_path, TINY.format(out=tmp_path / "runs", runs=runs))
    result = run_cli("run", str(path), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = lambda stage: json.loads((tmp_path / "runs" / stage / "upstack.json").read_text())  # noqa: E731
    metrics = manifest("cpt")["metrics"]
    mixture = metrics["mixture"]
    # noise is the least predictable domain, arith text and list instructions far less so
    assert mixture["noise"]["entropy_conditional"] > mixture["arith"]["entropy_conditional"]
    assert mixture["noise"]["share"] > max(mixture["arith"]["share"], mixture["listops"]["share"])
    assert sum(v["share"] for v in mixture.values()) == pytest.approx(1, abs=1e-3)
    # every source's held-out loss at every logging step
    assert set(metrics["eval_curves"]) == {"arith", "listops", "noise"}
    assert all([s for s, _ in c] == [2, 4, 6, 8] for c in metrics["eval_curves"].values())
    given = manifest("cpt_a")["metrics"]["mixture"]
    assert [given[n]["rows"] for n in ("arith", "listops", "noise")] == [90, 45, 15]

    # the same seed, the same shares: rebuilt from scratch
    again = tmp_path / "again"
    path2 = write_recipe(
        tmp_path,
        TINY.format(out=again, runs=RUN.format(name="cpt", weights="entropy")),
        "again.yaml",
    )
    assert run_cli("run", str(path2), cwd=tmp_path).returncode == 0
    rerun = json.loads((again / "cpt" / "upstack.json").read_text())["metrics"]["mixture"]
    assert {n: v["share"] for n, v in rerun.items()} == {n: v["share"] for n, v in mixture.items()}

    fit = run_cli(
        "mixture", "fit", str(path), "cpt", "cpt_a", "cpt_b", "--steps", "100", cwd=tmp_path
    )
    assert fit.returncode == 0, fit.stderr
    assert "best shares for 100 steps" in fit.stdout
    written = json.loads((tmp_path / "runs" / "mixture-fit.json").read_text())
    assert set(written["best_shares"]) == {"arith", "listops", "noise"}
    assert sum(written["best_shares"].values()) == pytest.approx(1, abs=1e-3)
    assert (tmp_path / "runs" / "mixture-fit.png").stat().st_size > 10_000

    one = run_cli("mixture", "fit", str(path), "cpt", cwd=tmp_path)
    assert one.returncode == 2 and one.stderr.strip().splitlines() == [
        "error: mixture fit: give two or more finished cpt stages run with other shares"
    ]
