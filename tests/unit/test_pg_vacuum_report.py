"""VACUUM FULL's report of kept rows is read in every language the server may speak.

The translations are PostgreSQL 15's own (Debian's postgres-15.mo files), of the msgid
"%.0f dead row versions cannot be removed yet.\\n%s.", formatted as the server does: a
shred on a server whose lc_messages is not English must not take kept key material
for none.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from keyledger.infrastructure.pg_vacuum_report import REPORTING_ROUTINE, kept_row_versions

TRANSLATIONS = {
    "en": "%.0f dead row versions cannot be removed yet.\n%s.",
    "de": "%.0f tote Zeilenversionen können noch nicht entfernt werden.\n%s.",
    "es": "%.0f versiones muertas de filas no pueden ser eliminadas aún.\n%s.",
    "fr": "%.0f versions de lignes ne peuvent pas encore être supprimées.\n%s.",
    "it": "%.0f versioni di riga morte non possono ancora essere rimosse.\n%s.",
    "ja": "%.0f 個の無効な行が今はまだ削除できません。\n%s.",
    "ka": "%.0f მკვდარი მწკრივის ვერსების წაშლა ჯერჯერობით შეუძლებელია.\n%s.",
    "ko": "%.0f 개의 사용하지 않는 로우 버전을 아직 지우지 못했음.\n%s.",
    "ru": 'В данный момент нельзя удалить "мёртвых" строк %.0f.\n%s.',
    "sv": "%.0f döda radversioner kan inte tas bort än.\n%s.",
    "uk": '%.0f "мертві" версії рядків досі не можуть бути видалені.\n%s.',
    "zh_CN": "仍有 %.0f 个死行版本暂时不能删除。\n%s。",
    "zh_TW": "仍有 %.0f 筆死資料列版本暫時不能刪除。\n%s。",
}
RUSAGE = "CPU: user: 0.01 s, system: 0.00 s, elapsed: 0.02 s"


@dataclass
class Notice:
    message_detail: str | None
    source_function: str | None = REPORTING_ROUTINE


def report(language: str, kept: int) -> Notice:
    return Notice(TRANSLATIONS[language] % (kept, RUSAGE))


@pytest.mark.parametrize("language", sorted(TRANSLATIONS))
@pytest.mark.parametrize("kept", [0, 1, 2048])
def test_the_kept_rows_are_read_in_every_language(language: str, kept: int) -> None:
    opening = Notice(None)  # 'vacuuming "schema.kl_key_material"': no detail
    assert kept_row_versions([opening, report(language, kept)]) == kept


def test_no_report_is_none_not_zero() -> None:
    assert kept_row_versions([]) is None
    assert kept_row_versions([Notice(None)]) is None


def test_a_report_whose_first_line_does_not_hold_one_number_is_none() -> None:
    assert kept_row_versions([Notice("some dead row versions remain.\n" + RUSAGE)]) is None
    assert kept_row_versions([Notice("2 of 3 dead row versions remain.\n" + RUSAGE)]) is None


def test_notices_of_other_routines_are_not_taken_for_the_report() -> None:
    other = Notice("5 rows were something else.", source_function="lazy_scan_heap")
    assert kept_row_versions([other]) is None
    assert kept_row_versions([other, report("de", 3)]) == 3


def test_without_the_routine_only_the_english_sentence_is_read() -> None:
    english = Notice(TRANSLATIONS["en"] % (4, RUSAGE), source_function=None)
    german = Notice(TRANSLATIONS["de"] % (4, RUSAGE), source_function=None)
    assert kept_row_versions([english]) == 4
    assert kept_row_versions([german]) is None
