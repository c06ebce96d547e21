"""Agency credit_score (0-100), recomputed from the ratings of the agency's workers.

The ratings component is a Bayesian average: the agency's stars plus CREDIT_PRIOR_WEIGHT
imaginary ratings of CREDIT_PRIOR_MEAN stars, mapped from 1..5 stars to 0..100. With no
ratings the score is 75; one new rating moves it by at most 100 / (n + 21) points, where n
is the number of earlier ratings, so no single resident can swing it far.
"""

from __future__ import annotations

from tortoise.functions import Count, Sum

from backend import clock
from backend.models import Agency, CreditEvent, Rating

CREDIT_PRIOR_MEAN = 4.0
CREDIT_PRIOR_WEIGHT = 20
INITIAL_CREDIT = round((CREDIT_PRIOR_MEAN - 1.0) / 4.0 * 100.0, 2)


def ratings_component(stars_sum: int, count: int) -> float:
    average = (stars_sum + CREDIT_PRIOR_MEAN * CREDIT_PRIOR_WEIGHT) / (count + CREDIT_PRIOR_WEIGHT)
    return round((average - 1.0) / 4.0 * 100.0, 2)


async def _current_components(agency_id: int) -> dict:
    """Compute the score's components from the agency's counted ratings (one aggregate query)."""
    totals = (
        await Rating.filter(agency_id=agency_id, counted=True)
        .annotate(stars_sum=Sum("stars"), count=Count("id"))
        .first()
        .values("stars_sum", "count")
    )
    stars_sum = int(totals["stars_sum"] or 0)
    count = int(totals["count"] or 0)
    return {"ratings": ratings_component(stars_sum, count), "rating_count": count}


async def recompute_credit(agency: Agency, *, reason_code: str, reason: str) -> float:
    """Recompute and store the agency's score, with a history entry when it changed.

    Call inside a transaction that has locked the agency row, so that two ratings landing at
    once cannot both compute from a view that misses the other.
    """
    components = await _current_components(agency.id)
    score = max(0.0, min(100.0, components["ratings"]))
    if score != agency.credit_score:
        agency.credit_score = score
        await agency.save(update_fields=["credit_score"])
        await CreditEvent.create(
            agency=agency,
            score=score,
            reason_code=reason_code,
            reason=reason,
            components=components,
            at=clock.now(),
        )
    return score


async def credit_report(agency: Agency) -> dict:
    events = await CreditEvent.filter(agency_id=agency.id).order_by("-id").limit(100)
    # Computed afresh rather than read from the latest event, because events that are no
    # recompute (an officer changing the agency's status) store no components.
    components = await _current_components(agency.id)
    return {
        "score": agency.credit_score,
        "components": components,
        "history": [
            {
                "score": event.score,
                "reason_code": event.reason_code,
                "reason": event.reason,
                "at": clock.to_local_iso(event.at),
            }
            for event in events
        ],
    }


async def ratings_summary(agency: Agency) -> dict:
    rows = await Rating.filter(agency_id=agency.id, counted=True).group_by("stars").annotate(n=Count("id")).values("stars", "n")
    distribution = {str(stars): 0 for stars in range(1, 6)}
    total = 0
    count = 0
    for row in rows:
        distribution[str(row["stars"])] = row["n"]
        total += row["stars"] * row["n"]
        count += row["n"]
    return {
        "count": count,
        "average": round(total / count, 2) if count else None,
        "distribution": distribution,
    }
