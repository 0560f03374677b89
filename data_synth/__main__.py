"""`python -m data_synth CONFIG.yaml --out DIR`: the synthetic data set alone, without upstack.

CONFIG holds SynthConfig's keys (seeds, teacher, augmentations, sampling, decontaminate), and
optionally `seed` and `pairs` (test_fraction, instruct_extra). DIR gets records.jsonl, the
instruct set and the DPO tuples; its request cache makes a rerun resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_synth", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", type=Path, help="YAML with seeds, teacher, augmentations, ...")
    parser.add_argument("--out", type=Path, required=True, help="output dir")
    args = parser.parse_args(argv)

    import yaml
    from pydantic import ValidationError

    from data_synth import DataSynthError, PairsConfig, SynthConfig, build_pairs, synthesize
    from data_synth.files import write_jsonl
    from data_synth.pairs import RECORDS, write_pairs

    try:
        raw = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise DataSynthError(f"{args.config}: expected a mapping of settings")
        seed = raw.pop("seed", 0)
        pairs_config = PairsConfig.model_validate(raw.pop("pairs", None) or {})
        config = SynthConfig.model_validate(raw)
        result = synthesize(config, seed=seed, cache_path=args.out / ".cache" / "requests.sqlite")
        write_jsonl(args.out / RECORDS, result.records)
        pairs = build_pairs(result.records, pairs_config, seed)
        write_pairs(pairs, args.out)
    except (OSError, yaml.YAMLError, DataSynthError) as err:
        where = f"{err.setting}: " if getattr(err, "setting", None) else ""
        print(f"error: {where}{str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except ValidationError as err:
        from data_synth.config import key_path

        first = err.errors()[0]
        key = ".".join(str(k) for k in key_path(first["loc"], raw))
        print(f"error: {args.config}: {key}: {first['msg']}", file=sys.stderr)
        return 2
    print(
        ", ".join(f"{k}={v}" for k, v in {**pairs.counts, "records": len(result.records)}.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
