"""data_synth: synthetic math data by rephrasing (SOLAR's Synth.Math-Instruct) and DPO tuples
(Synth.Math-Alignment), as a library: seeds, teachers, prompts, verification, a request cache.

    from data_synth import SynthConfig, synthesize
    config = SynthConfig.model_validate({
        "seeds": [{"source": "jsonl", "path": "problems.jsonl"}],
        "teacher": {"kind": "openai", "model": "Qwen/Qwen2.5-7B-Instruct",
                    "base_urls": ["http://localhost:8000/v1"]},
    })
    result = synthesize(config, seed=0, cache_path="requests.sqlite")   # rerun: resumes

It imports nothing from upstack; upstack's synth and pairs stages call it.
"""

from data_synth.errors import DataSynthError
from data_synth.pairs import Pairs, PairsConfig, build_pairs, read_records, write_pairs
from data_synth.rephrase import (
    Augmentations,
    Decontaminate,
    Sampling,
    SynthConfig,
    SynthResult,
    synthesize,
)
from data_synth.seeds import Problem, load_problems

__all__ = [
    "Augmentations",
    "DataSynthError",
    "Decontaminate",
    "Pairs",
    "PairsConfig",
    "Problem",
    "Sampling",
    "SynthConfig",
    "SynthResult",
    "build_pairs",
    "load_problems",
    "read_records",
    "synthesize",
    "write_pairs",
]
