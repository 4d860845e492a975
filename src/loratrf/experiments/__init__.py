"""Experiments on a real pretrained model and real data: `python -m loratrf.experiments --help`.

`studies.py` holds the paper's questions (methods, tasks, the pairs compared, the plot);
`runner.py` trains them (a learning-rate sweep on dev, then every seed), one file per run;
`results.py` reads those files and computes the paired statistics; `report.py` renders
docs/results.md. `demo` is the quick path: three methods at their default rates.
"""
