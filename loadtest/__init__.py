"""trimode load generator: a `vllm bench serve`-style benchmark for tri-mode serving.

Run ``python -m loadtest --base-url http://127.0.0.1:8000 ...`` or call :func:`run_benchmark`.
"""

from loadtest.config import BenchmarkConfig
from loadtest.report import format_report
from loadtest.runner import run_benchmark

__all__ = ["BenchmarkConfig", "format_report", "run_benchmark"]
