"""The data layer: records in, token ids out, subsets written back. One import direction, bottom to top:

  sources        datasets-library inputs (Parquet, Arrow, save_to_disk, hf:owner/name)
  kinds          the record kinds and their fields
  readers        records of .json/.jsonl/.csv files and of sources, with the line errors name; the JSONL reader
  hashing        the one hasher of inputs (file_sha256) and of records (record_id)
  conversations  multi-turn records: FieldMap, parsing into canonical turns
  records        Examples: kind detection, field checks, load_examples
  prompts        the text before an answer under each template (the one Llama-2 wrapper, chat templates)
  encoding       token ids, label masks, length-bucketed batches, collation
  writers        subsets written back (rank's selections, the audit's kept and flagged files)

Stages import what they use from here (`from safedata import data as D`); the names below are the layer's
public interface."""
from .conversations import DEFAULT_FIELD_MAP, FieldMap, field_map_of, recorded_field_map
from .encoding import (IGNORE_INDEX, Encoded, check_sizes, collate, encode, encode_examples, length_bucketed_batches,
                       pad_token_id, token_ids)
from .hashing import file_sha256, record_id
from .kinds import KIND_FIELDS
from .prompts import (SYS_NO_INPUT, SYS_WITH_INPUT, TEMPLATES, paper_prompt, plain_prompt, prompt_ids, prompt_text,
                      user_turn)
from .readers import jsonl_lines, read_jsonl, read_raw_records
from .records import Example, Excluded, detect_kind, empty_response_indices, known_kinds, load_examples, to_example
from .sources import INPUT_TYPES
from .writers import records_text, subset_suffix, write_records, write_subset
