"""Evaluation: perplexity and bits per byte, exact-match and multiple-choice tasks, few-shot prompts."""
