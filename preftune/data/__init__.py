"""Reading preference data: every format users bring, normalized to `PreferencePair`.

    train, val, report = load_pairs(cfg)
    pairs = read_dataset("pairs.jsonl,my_pairs", "data")

A dataset entry (in `dataset` / `eval_dataset`, comma-separated) is one of
  * a name registered in `<dataset_dir>/dataset_info.json` (LLaMA-Factory: alpaca or sharegpt
    ranking data, `columns` and `tags` maps, `file_name` or `hf_hub_url`);
  * a file: JSON array, JSON Lines, CSV, Parquet (gzip, bz2 or xz compressed too);
  * a folder written by `datasets.Dataset.save_to_disk`, or any folder `datasets.load_dataset`
    reads, optionally with `:split` (default `train`);
  * a Hugging Face dataset id, optionally with `:split`, read through `datasets`.

One module per step, each importing only those before it:
  readers.py   files -> [(where, record)]: formats, compression, encodings, malformed lines
  images.py    images of a pair (TRL's and LLaMA-Factory's formats): checked, resized, ImageRefs
  records.py   records -> PreferencePair / UnpairedExample: every record shape (standard, TRL
               conversational, UltraFeedback, hh-rlhf, alpaca, sharegpt, KTO, SFT, with images)
  registry.py  dataset_info.json entries: file or hub source, formatting, columns, tags
  load.py      entries -> checked examples: max_samples, shuffle, validation split, eval sets
Every problem names the file, the line (JSONL), row (CSV) or record index, the field, what was
expected and the fix. Nothing is dropped silently: skips are counted in `DataReport`.
"""

from preftune.data.load import (DataReport, check_pairs, load_eval_sets, load_pairs, read_dataset, read_examples,
                                read_prompts, source_of)
from preftune.data.records import PreferencePair, UnpairedExample

__all__ = ["DataReport", "PreferencePair", "UnpairedExample", "check_pairs", "load_eval_sets", "load_pairs",
           "read_dataset", "read_examples", "read_prompts", "source_of"]
