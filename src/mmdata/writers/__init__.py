"""Output formats. ``llamafactory`` writes records and ``dataset_info.json`` entries LLaMA-Factory loads unchanged."""
