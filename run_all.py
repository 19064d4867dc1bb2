#!/usr/bin/env python
"""Run the benchmark: `python run_all.py --dataset cifar10` (see README.md or --help)."""
import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
