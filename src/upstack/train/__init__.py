"""What the training stages (cpt, sft, dpo) share: their settings, data, TRL configuration, the
model and what of it trains, the training loop with its guards, and saving."""
