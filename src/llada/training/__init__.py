"""Pretraining and fine-tuning: corpora and packing, SFT data, the training config, the objectives
table (what data, batches and loss each objective uses), parallelism, the trainer and its plots."""
