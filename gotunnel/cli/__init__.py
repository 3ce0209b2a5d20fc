"""
Command lines: the twistd plugins' options, the console scripts' commands.
"""
