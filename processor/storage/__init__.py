"""Storage: the `services` table, the engines, the repository with the merge rule, the
migrations. Knows nothing of Pub/Sub."""

from processor.storage.engine import DEFAULT_DATABASE_URL, database_url, open_engine
from processor.storage.migrations import behind, migrate, unsuitable
from processor.storage.repository import Repository, UpsertResult
from processor.storage.table import Service

__all__ = [
    "DEFAULT_DATABASE_URL",
    "Repository",
    "Service",
    "UpsertResult",
    "behind",
    "database_url",
    "migrate",
    "open_engine",
    "unsuitable",
]
