"""``python -m fastbn.bench``: fastbn against torch eager, torch.compile and apex.

- ``shapes``    points (shape, dtype, layout, fusion), the suites, --shape parsing;
- ``traffic``   the bytes model (compulsory traffic per mode and fusion);
- ``problem``   a point's tensors, the float64 truth, the error measure and tolerances;
- ``providers`` the implementations under test;
- ``modes``     what one timed call of each mode does;
- ``timing``    CUDA-event and CPU timers, the copy bandwidth;
- ``runner``    the check-then-time loop and its long-format rows;
- ``report``    progress, the table, geometric means, JSON and the plot;
- ``meta``      what every result file records first (command, device, versions);
- ``extra``     ``--plan`` (``plan``) and ``--suite host`` (``host``);
- ``cli``       the command line.
"""
