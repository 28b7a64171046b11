"""distbert: a distributed MLPerf Inference BERT harness."""

__version__ = "0.1.0"
