"""Post-training that plugs into the one trainer: supervised fine-tuning data and objectives."""
