"""The fsspec edge: filesystem access, fault classification and retries, redaction of secrets, conditional writes."""
