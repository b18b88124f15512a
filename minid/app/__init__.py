"""The `minid` command: its options, the commands, and the jobs only the command runs (validate, the
demo, evaluate).

Reading order: options, cli, validate, demo, evaluate.
"""
