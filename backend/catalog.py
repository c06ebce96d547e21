"""Service categories offered through the mini-program, with the certificate level each needs."""

from __future__ import annotations

from dataclasses import dataclass

from backend.models import CERTIFICATE_RANKS


@dataclass(frozen=True)
class Category:
    code: str
    name: str
    min_certificate_level: str


# Work with children, mental health and family conflict carries more risk, so it requires a
# full 社会工作师 certificate. A 助理社会工作师 may do the rest.
CATEGORIES: tuple[Category, ...] = (
    Category("elderly_care", "养老照护", "assistant"),
    Category("child_care", "儿童关爱", "intermediate"),
    Category("disability_care", "助残服务", "assistant"),
    Category("medical_escort", "就医陪诊", "assistant"),
    Category("poverty_relief", "困难救助", "assistant"),
    Category("mental_health", "心理支持", "intermediate"),
    Category("family_support", "家庭支持", "intermediate"),
)

CATEGORIES_BY_CODE = {category.code: category for category in CATEGORIES}


def min_rank(category_code: str) -> int:
    return CERTIFICATE_RANKS[CATEGORIES_BY_CODE[category_code].min_certificate_level]
