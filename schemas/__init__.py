"""Wire and boundary types of evostream (pydantic v2, JSON on the wire)."""
