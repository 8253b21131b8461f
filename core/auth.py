"""Credentials on the wire: the metadata names every Tandem server and client agree on."""

from __future__ import annotations

# An API key from a client to a router (or a tier behind one): the SDK's ``api_key=``.
API_KEY_HEADER = "x-api-key"
