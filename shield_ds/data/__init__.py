"""The data room: records, readers and adapters, typographic images, collation, rank sharding."""

from shield_ds.data.collate import Batch, SafetyCollator
from shield_ds.data.images import load_image, render_typographic
from shield_ds.data.layouts import default_data_dir, load_source
from shield_ds.data.records import CARRIER_PROMPT, KNOWN_LANGUAGES, LANGUAGES, SafetyRecord
from shield_ds.data.selection import load_labeled, select_records, with_modalities
from shield_ds.data.sharding import plan_batches, shard_batches

__all__ = [
    "Batch", "CARRIER_PROMPT", "KNOWN_LANGUAGES", "LANGUAGES", "SafetyCollator", "SafetyRecord",
    "default_data_dir", "load_image", "load_labeled", "load_source", "plan_batches", "render_typographic",
    "select_records", "shard_batches", "with_modalities",
]
