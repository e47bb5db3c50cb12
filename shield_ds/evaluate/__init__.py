"""Evaluation: judges (refusal matching, model judges) and ASR tables per language x modality."""

from shield_ds.evaluate.asr import (AsrCell, AsrTable, Rate, asr_table, compare, compare_markdown, load_asr,
                                    read_generations, transfer_markdown, transfer_table, validate_record,
                                    wilson_interval, write_asr_reports, write_generations)
from shield_ds.evaluate.judges import Judge, ModelJudge, annotate
from shield_ds.evaluate.refusal import RefusalMatcher, normalize

__all__ = ["AsrCell", "AsrTable", "Rate", "asr_table", "compare", "compare_markdown", "load_asr", "read_generations",
           "transfer_markdown", "transfer_table", "validate_record", "wilson_interval", "write_asr_reports",
           "write_generations", "Judge", "ModelJudge", "RefusalMatcher", "annotate", "normalize"]
