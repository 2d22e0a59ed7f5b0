"""Membership inference, canary exposure and privacy auditing."""
