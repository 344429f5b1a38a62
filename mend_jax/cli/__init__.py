"""The command-line tools (`mend-train`, `mend-eval`, `mend-edit`; `python train.py` etc. in a
checkout): parse arguments, call the library, print. Each module has `main(argv=None) -> int`.
"""
