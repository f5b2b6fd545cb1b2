"""Data: one module per dataset family (its reader and TFDS builder), the shared reading
machinery, the loader, and the tokenised batches.

  reading.py       readers of JSON lines and JSON arrays, row checks, errors, the base builder
                   (schema, manual-dir checks, the skipped-row and partial-file report)
  anthropic_hh.py  Anthropic HH-RLHF pairs
  tldr.py          OpenAI summarize-from-feedback (TL;DR) comparisons
  shp.py           Stanford Human Preferences pairs
  taskmaster.py    Taskmaster-4 Coffee: pointwise reward examples and dialogs (demonstrations)
  jsonl.py         your own pairwise or pointwise JSON lines (what the prefs stage writes)
  loader.py        the datasets by name, load_preferences, data_fingerprint, check_manual_files
  batching.py      tokenised, padded arrays and a deterministic, resumable batch order

Nothing is imported here: TFDS is slow to import and only the stages that read data need it.
"""
