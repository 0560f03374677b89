"""data_synth: seed problems, teachers, rephrasing, verification and DPO tuples (synth and pairs stages)."""
