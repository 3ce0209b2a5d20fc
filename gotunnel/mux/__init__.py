"""
The mux extension: many user streams over one data connection.
"""
