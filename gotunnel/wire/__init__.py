"""
The wire protocol: its messages and the framing every connection starts with.
"""
