"""The catalog API's bearer token: given, read from a file, or kept in a Secrets Manager secret (made there
on first use, so it never passes through Pulumi); see :mod:`services.sight_catalog.api` for who needs it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.errors import UserError

TOKEN_ENV = "TESSERA_CATALOG_TOKEN"
TOKEN_FILE_ENV = "TESSERA_CATALOG_TOKEN_FILE"
TOKEN_SECRET_ENV = "TESSERA_CATALOG_TOKEN_SECRET_ARN"
#: The shortest token accepted (a guessable token is no protection).
MIN_TOKEN_CHARS = 16


def check_token(token: str) -> str:
    """``token`` when it is usable: printable ASCII without spaces, at least :data:`MIN_TOKEN_CHARS` long."""
    if not all("!" <= c <= "~" for c in token):
        raise UserError(f"the catalog's token ({TOKEN_ENV}) must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            f"the catalog's token ({TOKEN_ENV}) has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def catalog_token(
    token: str | None = None,
    *,
    token_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    secrets_client: Any = None,
) -> str | None:
    """The bearer token: ``token``, else ``token_file``'s first line, else ``TESSERA_CATALOG_TOKEN``, else
    the file named by ``TESSERA_CATALOG_TOKEN_FILE``, else the Secrets Manager secret named by
    ``TESSERA_CATALOG_TOKEN_SECRET_ARN``; None when none is set. UserError for an unusable token or an
    unreadable file or secret."""
    env = os.environ if env is None else env
    if token:
        return check_token(token)
    path = token_file or env.get(TOKEN_FILE_ENV)
    if not path and env.get(TOKEN_ENV):
        return check_token(env[TOKEN_ENV])
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        lines = text.strip().splitlines()
        if not lines:
            raise UserError(f"the token file {path} is empty")
        return check_token(lines[0].strip())
    arn = env.get(TOKEN_SECRET_ENV)
    if arn:
        return check_token(_secret(arn, env, secrets_client))
    return None


#: The version id of the token the catalog makes itself: the same on every instance, so when several start
#: at once Secrets Manager keeps the first one stored and every instance reads that one.
FIRST_TOKEN_VERSION = "tessera-catalog-first-token-0000000000000000"


def _secret(arn: str, env: Mapping[str, str], client: Any) -> str:
    """The token in the secret at ``arn``; a secret that holds none yet (the platform creates it empty, so
    the token never passes through Pulumi) gets a fresh one, stored once whoever stores it first."""
    import secrets

    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        import boto3

        client = boto3.client(
            "secretsmanager",
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
        )

    def read() -> str | None:
        try:
            return str(client.get_secret_value(SecretId=arn).get("SecretString") or "").strip() or None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None  # the secret exists with no value yet (or does not exist: put says which)
            raise

    try:
        value = read()
        if value is None:
            try:
                client.put_secret_value(
                    SecretId=arn,
                    SecretString=secrets.token_urlsafe(32),
                    ClientRequestToken=FIRST_TOKEN_VERSION,
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceExistsException":
                    raise  # another instance stored its token first: read that one below
            value = read()
    except (ClientError, BotoCoreError) as exc:
        raise UserError(f"cannot read the catalog's token from {arn}: {exc}") from None
    if not value:
        raise UserError(f"the secret {arn} holds no token")
    return value
