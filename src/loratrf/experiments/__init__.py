"""Experiments on a real pretrained model and real data: `python -m loratrf.experiments --help`.

`demo` compares full fine-tuning, LoRA and LoRATRF on movie sentiment; `grid` runs the paper's
studies (rank, module choice, filter ablations, other domains, TREC) over seeds; `report`
turns a results.json into a Markdown page. `story` is the small end-to-end tour of the API.
"""
