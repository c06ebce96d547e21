"""The geo index of matchable workers, behind one interface (see search.base.WorkerIndex)."""

from search.base import SearchHit, SearchQuery, WorkerDocument, WorkerIndex, IndexUnavailable

__all__ = ["SearchHit", "SearchQuery", "WorkerDocument", "WorkerIndex", "IndexUnavailable"]
