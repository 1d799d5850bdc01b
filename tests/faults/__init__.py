"""The fault suite (issue 9): real worker, Redis and SMTP server; one fault per scenario."""
