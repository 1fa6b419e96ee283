"""Corpus scans: for every component (MLP neuron, attention head, SAE latent) its top-k dataset
examples, a random sample and statistics, written as Parquet. See docs/scan.md.

    >>> from tdb.scan import ScanSettings, scan
    >>> scan(Path("corpus.txt"), Path("out"), ScanSettings(k=20, window=64))
"""

from tdb.scan.run import ScanResult, scan
from tdb.scan.shard import ScanSettings

__all__ = ["ScanResult", "ScanSettings", "scan"]
