"""The cheap signals (keywords, regexes, length, modality, headers, tenant, language, scores):
one class per kind declares its keys, and evaluates itself on a request."""
