"""Reference models that several packages build on: BM25 over product text, softmax regression.

Below both ``labeling`` (BM25 candidates, the softmax teacher) and ``evaluation`` (the BM25 baseline,
the linear probe), so neither has to import the other.
"""
