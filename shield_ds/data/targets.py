"""Training targets: refusals for harmful prompts, helpful answers for benign ones.

Harmful records without a response get a refusal in their language from the templates below
(or from a user file: JSON/YAML mapping language -> list of refusals). Benign records without a
response need answers from somewhere: `--benign-targets self` has the base model answer them once
before training (distillation keeps its utility); the recipe caches those answers. With a pivot language
(`--benign-pivot en`) a benign prompt of another language is answered by the model's answer to the same
question in the pivot language, for a model whose own answers in that language are loops or garbled text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

from shield_ds.data.records import SafetyRecord
from shield_ds.errors import ShieldError
from shield_ds.io import read_mapping

REFUSALS: dict[str, list[str]] = {
    "en": ["I'm sorry, but I can't help with that. It could cause serious harm.",
           "I can't assist with this request because it could hurt people."],
    "zh": ["抱歉，我无法提供帮助。这可能会造成严重伤害。",
           "对不起，我不能协助这个请求，因为它可能伤害他人。"],
    "it": ["Mi dispiace, ma non posso aiutarti con questa richiesta. Potrebbe causare gravi danni.",
           "Non posso aiutarti in questo, perché potrebbe fare del male ad altre persone."],
    "vi": ["Xin lỗi, tôi không thể giúp bạn việc này. Điều đó có thể gây ra tác hại nghiêm trọng.",
           "Tôi không thể hỗ trợ yêu cầu này vì nó có thể gây hại cho người khác."],
    "ar": ["عذرًا، لا أستطيع المساعدة في ذلك. قد يتسبب ذلك في ضرر جسيم.",
           "لا يمكنني المساعدة في هذا الطلب لأنه قد يؤذي الآخرين."],
    "ko": ["죄송하지만 그 요청은 도와드릴 수 없습니다. 심각한 피해를 초래할 수 있습니다.",
           "다른 사람에게 해를 끼칠 수 있으므로 이 요청은 도와드릴 수 없습니다."],
    "th": ["ขออภัย ฉันไม่สามารถช่วยเรื่องนี้ได้ เพราะอาจก่อให้เกิดอันตรายร้ายแรง",
           "ฉันไม่สามารถช่วยตามคำขอนี้ได้ เพราะอาจทำร้ายผู้อื่น"],
    "bn": ["দুঃখিত, আমি এতে সাহায্য করতে পারব না। এটি গুরুতর ক্ষতির কারণ হতে পারে।",
           "আমি এই অনুরোধে সাহায্য করতে পারি না, কারণ এটি অন্যদের ক্ষতি করতে পারে।"],
    "sw": ["Samahani, siwezi kusaidia na hilo. Linaweza kusababisha madhara makubwa.",
           "Siwezi kusaidia ombi hili kwa sababu linaweza kuwadhuru watu wengine."],
    "jv": ["Nyuwun pangapunten, kula mboten saged mbiyantu bab punika. Punika saged njalari cilaka ingkang ageng.",
           "Aku ora bisa mbantu panjaluk iki amarga bisa nglarani wong liya."],
}


# Sentence ends. Latin-style marks count only before whitespace, a closing quote/bracket or the end
# ("3.5", "e.g" are not ends); full-width and script-specific marks (CJK, Arabic, Urdu, Bengali/Devanagari
# danda, Ethiopic, Myanmar) count anywhere. Closing quotes and brackets right after the mark stay.
_CLOSERS = "\"'”’»)]}」』）】〉》"
_SENTENCE_END = re.compile(rf"(?:[。！？｡．؟۔।॥።။]|[.!?](?=[\s{re.escape(_CLOSERS)}]|$))[{re.escape(_CLOSERS)}]*")


def cut_at_sentence_end(text: str) -> str | None:
    """`text` up to and including its last sentence end (with closing quotes), or None if it has none.

    For answers that hit the generation limit mid-sentence: the cut answer is trained without an end
    of turn, so the model learns neither the broken sentence nor to stop early.
    """
    last = None
    for last in _SENTENCE_END.finditer(text):
        pass
    if last is None or not text[:last.start()].strip():
        return None
    return text[:last.end()]


def load_refusals(path: str | Path | None = None) -> dict[str, list[str]]:
    """The shipped templates, updated with a user file (JSON or YAML: language -> [refusals])."""
    refusals = {k: list(v) for k, v in REFUSALS.items()}
    if path is None:
        return refusals
    data = read_mapping(path, "refusal templates file")
    if not all(isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v) for v in data.values()):
        raise ShieldError(f"{path}: expected a mapping of language code to a non-empty list of refusals")
    refusals.update({str(k): list(v) for k, v in data.items()})
    return refusals


def refusal_for(record: SafetyRecord, refusals: dict[str, list[str]]) -> str:
    """A refusal in the record's language, chosen deterministically from its id."""
    templates = refusals.get(record.language)
    if not templates:
        raise ShieldError(f"no refusal template for language {record.language!r} (record {record.id}); "
                          f"add one with --refusals FILE")
    pick = int(hashlib.sha256(record.id.encode()).hexdigest(), 16) % len(templates)
    return templates[pick]


def with_refusals(records: list[SafetyRecord], refusals: dict[str, list[str]]) -> list[SafetyRecord]:
    """Harmful records without a response get a refusal; everything else is unchanged."""
    return [replace(r, response=refusal_for(r, refusals)) if r.label == "harmful" and not r.response else r
            for r in records]


def with_responses(records: list[SafetyRecord], responses: dict[str, str]) -> list[SafetyRecord]:
    """Fill missing responses from `responses` (record id -> text)."""
    return [replace(r, response=responses[r.id]) if not r.response and r.id in responses else r for r in records]


def pivot_sources(records: list[SafetyRecord], pivot_records: list[SafetyRecord],
                  pivot: str) -> dict[str, SafetyRecord]:
    """Record id -> the `pivot`-language record whose answer becomes its target: for every benign record
    without a response in another language, the pivot record of the same prompt key and modality. Records
    without such a version are left out (they keep their own prompt)."""
    by_key = {(r.prompt_key, r.modality): r for r in pivot_records if r.label == "benign" and r.language == pivot}
    return {r.id: by_key[(r.prompt_key, r.modality)] for r in records
            if r.label == "benign" and not r.response and r.language != pivot
            and (r.prompt_key, r.modality) in by_key}


def check_targets(records: list[SafetyRecord]) -> None:
    """Every training record needs a response; name the first one that has none."""
    missing = [r for r in records if not r.response]
    if missing:
        raise ShieldError(f"{len(missing)} {missing[0].label} record(s) have no response (first: {missing[0].id} "
                          f"from {missing[0].source or 'the data'}); give responses in the data or use "
                          f"--benign-targets self")
