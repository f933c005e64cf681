"""Claim checks: a message body too large for a queue message waits in a blob of the same account.

A deferral envelope (or a `-rejected` record) whose text would not fit the queue's limit carries the
blob's name instead of the body. The name derives from the queue and the message's key, so a twin
copy (a crash between send and complete) names the same blob. Container `intake-claims`, created on
first use; the blob is deleted once its record is done, and kept while anything still refers to it.
"""

from __future__ import annotations

import hashlib
import re

from shared import storage

CONTAINER = "intake-claims"
NAME = re.compile(r"^[a-z0-9-]{1,63}/[0-9a-f]{64}\Z")  # what `name` makes; anything else is not ours


def name(queue: str, key: str) -> str:
    return f"{queue}/{hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def put(queue: str, key: str, body: bytes) -> str:
    """Store `body` (overwriting a twin's identical copy); returns the claim."""
    from azure.core.exceptions import ResourceNotFoundError

    claim = name(queue, key)
    container = storage.container(CONTAINER)
    try:
        container.upload_blob(claim, body, overwrite=True)
    except ResourceNotFoundError:  # the container does not exist yet
        from azure.core.exceptions import ResourceExistsError

        try:
            container.create_container()
        except ResourceExistsError:
            pass
        container.upload_blob(claim, body, overwrite=True)
    return claim


def get(claim: str) -> bytes | None:
    """The body, or None when the blob is gone."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return storage.container(CONTAINER).download_blob(claim).readall()
    except ResourceNotFoundError:
        return None


def delete(claim: str) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        storage.container(CONTAINER).delete_blob(claim)
    except ResourceNotFoundError:
        pass
