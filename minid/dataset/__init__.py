"""Calibrating a face dataset: the manifest, the rows, the job (local engine or Ray Data), the
report.

Reading order: manifest, rows, job, report.
"""
