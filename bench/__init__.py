"""Speed and memory of opd_kernels against PyTorch and the peers (`python -m bench`).

Layout: ``registry`` (model shapes and presets), ``workloads`` (inputs and roofline floors),
``impls`` (ours, the PyTorch baselines, the peers), ``timing`` (one measurement, OOM-safe),
``roofline`` (ceilings measured in the same run), ``runner`` (the suite), ``report`` (JSON,
markdown, PNG), ``hopper_report`` (static sm_90 compile report), ``correctness`` (GPU check).
"""
