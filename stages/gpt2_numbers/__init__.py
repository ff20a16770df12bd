"""gpt2_numbers: the path patching paper's GPT-2 experiment, as a DVC project of its own (see __main__.py)."""
