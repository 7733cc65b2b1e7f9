"""Fault injection: the scoring job and the endpoint under bad data, kills and hostile clients."""
