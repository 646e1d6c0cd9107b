"""A hybrid-parallel DLRM-style trainer that measures what DCT saves
(docs/design.md#end-to-end-hybrid-parallel-dlrm).

Modules: ``data`` (synthetic click logs from a planted teacher), ``criteo`` (a Criteo TSV
reader), ``model`` (embedding shards with ReLU towers, the data-parallel MLPs), ``exchange``
(the model-parallel all-to-all: dense, bf16 or DCT-MP), ``dp_traffic`` (DP byte counting;
the dense, bf16 and PowerSGD hooks), ``runner`` (one rank's training and evaluation),
``report`` (JSON, markdown, plots), ``context`` (the rank's device, the data set, the
teacher's AUC), ``sweep`` (DP ratio x MP k), ``cli`` (launch). Entry point:
``bench/train_dlrm.py``.
"""
