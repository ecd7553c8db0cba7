"""tierserve decision logic and runners: pure Python, importable with or without Triton."""
