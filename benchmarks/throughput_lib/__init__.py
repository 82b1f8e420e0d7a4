"""The pieces of ``benchmarks/throughput.py``, one job per module (the script is the command line)."""
