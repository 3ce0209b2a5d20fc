"""
UDP tunnels (the udp extension, docs/protocol.md).
"""
