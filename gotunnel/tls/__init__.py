"""
TLS: contexts from the settings, certificates, half-close and the server name of a ClientHello.
"""
