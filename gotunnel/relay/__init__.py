"""
Moving bytes between a user's connection and its data channel: splicing, zero copy, the splice thread.
"""
